"""The shared store: what the HTTP API and the workers both stand on. Database models and
repositories (db/), job states (lifecycle), the Redis queue, keys and events, artifacts,
settings and logs. It imports nothing of ours but the trainer's config types."""
