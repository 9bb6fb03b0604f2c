"""The HTTP routes, one module per resource (each with its own APIRouter and prefix)."""
