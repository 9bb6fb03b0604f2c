"""The HTTP API: the app factory, its dependencies, auth, schemas, errors, the submission
path, and one router module per resource under routes/."""
