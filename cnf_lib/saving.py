"""One way to save a trained model and load it back: :func:`save_model`, :func:`load_model`.

A saved file holds what rebuilds the model — its kind, its ``config()`` (field class and
widths, activation, ``t1``, solver settings; for a cell density the standardization and the
training configuration; for a trajectory model its time points) — and its tensors, written
with ``torch.save`` and read with ``weights_only=True`` (loading never executes code).

Kinds: a :class:`~cnf_lib.cnf.CNF`, a :class:`~cnf_lib.timecourse.TrajectoryCNF` and a
:class:`~cnf_lib.singlecell.CellDensity`. ``load_model(path)`` rebuilds a model with the default
field; ``load_model(path, model=m)`` loads the saved parameters into ``m`` after checking that
its ``config()`` is the saved one, refusing a mismatch with a ``ValueError`` that names every
field that differs (a custom field must be loaded this way). A trainer's checkpoint
(:meth:`cnf_lib.train.Trainer.save`) holds the same model state, plus what resumes training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .train import config_differences

__all__ = ["save_model", "load_model", "model_to_uns", "model_from_uns", "plain_config", "MODEL_FORMAT",
           "MODEL_VERSION"]

MODEL_FORMAT = "cnf_lib.model"
MODEL_VERSION = 1


def _kinds() -> dict[str, type]:
    """The classes that can be saved, by name (imported here: the core does not import them)."""
    from .cnf import CNF
    from .singlecell import CellDensity
    from .timecourse import TrajectoryCNF

    return {"CNF": CNF, "TrajectoryCNF": TrajectoryCNF, "CellDensity": CellDensity}


def _state(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a model, tensors on the CPU."""
    if hasattr(model, "save_state"):  # a CellDensity
        return model.save_state()
    return model.config(), {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_model(model: Any, path: str | os.PathLike) -> Path:
    """Write a trained model to ``path`` (atomically: a killed process leaves no half file).

    Arguments:
        model: a :class:`~cnf_lib.cnf.CNF`, :class:`~cnf_lib.timecourse.TrajectoryCNF` or
            :class:`~cnf_lib.singlecell.CellDensity`, on any device.
        path: the file.

    Returns:
        The path written.
    """
    kinds = _kinds()
    kind = type(model).__name__
    if kind not in kinds or not isinstance(model, kinds[kind]):
        raise ValueError(f"cannot save a {kind}; save_model saves one of {sorted(kinds)}")
    config, tensors = _state(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(format=MODEL_FORMAT, version=MODEL_VERSION, kind=kind, config=config, tensors=tensors), tmp)
    os.replace(tmp, path)
    return path


def load_model(path: str | os.PathLike, model: Any = None, device: str | torch.device = "cpu") -> Any:
    """Load a model written by :func:`save_model`.

    Arguments:
        path: the file.
        model: load into this model (same kind and ``config()``; needed for a custom field)
            instead of building a new one.
        device: where the loaded model is placed.

    Returns:
        The model, in evaluation mode, on ``device``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a saved cnf_lib model, a newer format, or ``model`` of another kind or
            configuration (the message names each field that differs).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved model at {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign files fail in many ways inside torch
        raise ValueError(f"cannot read {path}: it is truncated or not a torch file ({err})") from err
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a model saved by cnf_lib.saving.save_model "
                         "(a trainer checkpoint is read by Trainer.resume)")
    if saved.get("version") != MODEL_VERSION:
        raise ValueError(f"{path} has format version {saved.get('version')}; this cnf_lib reads {MODEL_VERSION}")
    kinds = _kinds()
    cls = kinds[saved["kind"]]
    if model is None:
        return cls.from_saved(saved["config"], saved["tensors"]).to(device).eval() \
            if hasattr(cls, "from_saved") else _into(cls.from_config(saved["config"]), saved, path, device)
    if type(model).__name__ != saved["kind"]:
        raise ValueError(f"{path} holds a {saved['kind']}, not a {type(model).__name__}")
    if hasattr(model, "save_state"):
        raise ValueError("load a CellDensity with load_model(path) (it is rebuilt whole)")
    return _into(model, saved, path, device)


def plain_config(value: Any) -> Any:
    """Config values HDF5 can store: None dropped, tuples as lists, nested dictionaries kept."""
    if isinstance(value, dict):
        return {k: plain_config(v) for k, v in value.items() if v is not None}
    if isinstance(value, tuple):
        return list(value)
    return value


def _python(value: Any) -> Any:
    """Values read back from .h5ad as Python values (NumPy scalars and arrays to numbers and lists)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: _python(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def model_to_uns(model: Any) -> dict[str, Any]:
    """A :class:`~cnf_lib.cnf.CNF` or :class:`~cnf_lib.timecourse.TrajectoryCNF` as plain values
    and NumPy arrays for ``adata.uns`` (it survives ``write_h5ad``/``read_h5ad``): the same
    content as :func:`save_model`'s file. :func:`model_from_uns` rebuilds it."""
    kind = type(model).__name__
    if kind not in ("CNF", "TrajectoryCNF"):
        raise ValueError(f"model_to_uns stores a CNF or a TrajectoryCNF, not a {kind}")
    config, tensors = _state(model)
    return dict(format=MODEL_FORMAT, version=MODEL_VERSION, kind=kind, config=plain_config(config),
                tensors={k: v.numpy() for k, v in tensors.items()})


def model_from_uns(uns: Any, device: str | torch.device = "cpu") -> Any:
    """Rebuild a model stored by :func:`model_to_uns` (also after an .h5ad round trip), in
    evaluation mode on ``device``."""
    if not hasattr(uns, "get") or uns.get("format") != MODEL_FORMAT:
        raise ValueError("not a model stored by cnf_lib.saving.model_to_uns (its 'format' entry is missing)")
    if int(uns.get("version", -1)) != MODEL_VERSION:
        raise ValueError(f"stored model format version {uns.get('version')}; this cnf_lib reads {MODEL_VERSION}")
    cls = _kinds()[str(uns["kind"])]
    model = cls.from_config(_python(uns["config"]))
    model.load_state_dict({k: torch.as_tensor(v) for k, v in uns["tensors"].items()})
    return model.to(device).eval()


def _into(model: nn.Module, saved: dict[str, Any], path: Path, device: str | torch.device) -> nn.Module:
    diff = config_differences(saved["config"], model.config())
    if diff:
        raise ValueError(f"{path} holds a model of another configuration; " + "; ".join(diff))
    model.load_state_dict(saved["tensors"])
    return model.to(device).eval()
