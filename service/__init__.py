"""unroll's service, in three layers over the pure `trainer` package:

    service.cli      the command line and operations (top: may import everything)
    service.api      the HTTP API                 workers   the dispatcher and Ray tasks
    service.store    the shared store: database, job states, queue, keys, events, artifacts, settings
    trainer          the TBPTT engine (imports nothing of ours)

The API and the workers stand side by side on the store and never import each other; the
import-linter contracts in pyproject.toml keep it so (docs/architecture.md).
"""
