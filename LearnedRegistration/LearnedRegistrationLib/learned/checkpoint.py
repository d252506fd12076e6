"""Self-describing network checkpoints: ``{format, architecture_version, config, state_dict, metadata}``.

A checkpoint rebuilds its :class:`network.RegistrationNetwork` from the file alone (the config
travels with the weights, as in voxelmorph's ``modelio.py``), and is read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects: everything in the file
is tensors, dicts, lists, strings and numbers. ``metadata`` records how the weights were made
(training data, iterations, wall time, device, validation curve, command line ...) and must be
made of those plain types too.

Loading refuses, in one line naming the file, anything that is not such a checkpoint: a corrupt
or truncated file, a file that holds other pickled Python objects (never loaded, and torch's advice
to retry with ``weights_only=False`` is not repeated: that is the unsafe step), a config out of
:class:`network.NetworkConfig`'s bounds, and NaN or infinite weights. Finite weights can still
overflow on an image (weights scaled by 1e30), which no small test input rules out for every
image; the command line refuses such a registration from its computed fields (``app.cli``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Optional, Union

import torch

from .network import ARCHITECTURE_VERSION, NetworkConfig, RegistrationNetwork

#: Identifies our checkpoints among other ``.pt`` files.
CHECKPOINT_FORMAT = "learnedregistration.registration_network"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, or does not fit this code's network."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


def save_checkpoint(path: PathLike, network: RegistrationNetwork, metadata: Optional[dict] = None) -> Path:
    """Write ``network`` (config + weights on CPU) and ``metadata`` to ``path``; creates parent folders.

    The file is written to a temporary name and renamed, so an interrupted save never leaves a
    truncated checkpoint under ``path``.

    Returns:
        The path written.

    Raises:
        ValueError: if ``metadata`` holds something ``torch.load(weights_only=True)`` could not read back.
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "architecture_version": ARCHITECTURE_VERSION,
        "config": network.config.to_dict(),
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    _check_plain("metadata", payload["metadata"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _check_plain(where: str, value) -> None:
    # Exact types: subclasses (torch.__version__ is a TorchVersion, numpy floats ...) pickle as
    # their own class, which torch.load(weights_only=True) refuses.
    if value is None or type(value) in (bool, int, float, str):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(f"{where}[{i}]", v)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"checkpoint {where} keys must be str or int, got {type(k).__name__}")
            _check_plain(f"{where}[{k!r}]", v)
        return
    raise ValueError(
        f"checkpoint {where} must hold only None/bool/int/float/str/list/dict, got {type(value).__name__}"
    )


def read_checkpoint(path: PathLike) -> dict:
    """Read and validate a checkpoint file without building the network.

    Returns:
        The payload dict (``config``, ``state_dict``, ``metadata`` ...).

    Raises:
        CheckpointNotFoundError: if ``path`` does not exist.
        CheckpointError: if it cannot be read with ``weights_only=True`` or is not one of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"network weights file '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only=True refused a Python object; torch's message advises loading with
        # weights_only=False, the unsafe step, so it is not passed on.
        raise CheckpointError(
            f"'{path}' is not a valid LearnedRegistration weights file: it holds Python objects other than "
            "tensors and plain values, which are never loaded"
        ) from None
    except Exception:  # torch raises several types (RuntimeError, EOFError, OSError ...) for damaged files
        raise CheckpointError(
            f"'{path}' is not a valid LearnedRegistration weights file (corrupt, truncated or not a torch file)"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"'{path}' is not a LearnedRegistration network checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    version = payload.get("architecture_version")
    if version != ARCHITECTURE_VERSION:
        raise CheckpointError(
            f"network weights file '{path}' has architecture version {version!r}; "
            f"this code reads version {ARCHITECTURE_VERSION}"
        )
    for key, kind in (("config", dict), ("state_dict", dict), ("metadata", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"network weights file '{path}' has no valid '{key}' entry")
    return payload


def load_checkpoint(path: PathLike, device=None) -> tuple[RegistrationNetwork, dict]:
    """Rebuild the network stored in ``path`` and return ``(network in eval mode, metadata)``.

    Args:
        path: a file written by :func:`save_checkpoint`.
        device: where to put the network (default CPU).

    Raises:
        CheckpointNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is corrupt, not a checkpoint, its config/weights do not fit
            :class:`network.RegistrationNetwork`, or a weight is NaN or infinite (the message
            names the file).
    """
    payload = read_checkpoint(path)
    try:
        network = RegistrationNetwork(NetworkConfig.from_dict(payload["config"]))
        network.load_state_dict(payload["state_dict"], strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"network weights file '{path}' does not match this code's network: {reason}") from None
    for name, tensor in network.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"network weights file '{path}' is not usable: its weights '{name}' hold NaN or infinite values"
            )
    network.eval()
    if device is not None:
        network.to(device)
    return network, payload["metadata"]

