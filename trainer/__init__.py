"""The TBPTT trainer. `trainer.load(path)` and `trainer.export(...)` use a trained model
(trainer/inference.py, trainer/exporting.py); they import torch on first use, so importing the
package (the service reads trainer.config) stays light."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load":
        from trainer.inference import load

        return load
    if name == "export":
        from trainer.exporting import export

        return export
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
