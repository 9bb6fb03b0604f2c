"""Ray's token authentication, as the dispatcher (a Ray driver) needs it.

Ray 2.60 turns token authentication on by default for a new cluster (RAY_AUTH_MODE=token)
and keeps the token in ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH, or the RAY_AUTH_TOKEN
variable itself). A driver joining an existing cluster sends the token only when
RAY_AUTH_MODE=token is set before `ray` is imported, so we set it whenever a token is at
hand. RAY_AUTH_MODE set in the environment always wins (disabled opts out).

On a real cluster: start the head with `ray start --head`, copy its token file to every
worker node and to every machine that runs `unroll worker` (or export RAY_AUTH_TOKEN there),
and point UNROLL_RAY_ADDRESS at the head.
"""

from __future__ import annotations

import os


def use_ray_token() -> None:
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(path):
        os.environ["RAY_AUTH_MODE"] = "token"
