"""The PyTorch engine: a checkpoint's UNet behind the same contract as the exported graphs."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from promptseg.runtime.engine_base import MASK_OUTPUT, PRESENCE_OUTPUT, BackendError, Engine
from promptseg.runtime.errors import InputError, first_line
from promptseg.runtime.manifest import EngineFolder, TensorSpec, sha256_file


def _import_torch() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ImportError(
            "the torch backend needs PyTorch: pip install 'promptseg[train]'"
        ) from exc


def _split_output(out: Any) -> tuple[Any, Any | None]:
    """(mask logits, presence logits or None) of a UNet forward that returns either a tensor
    or a tuple ``(mask_logits (B, 1, H, W), presence_logits (B, 1))``."""
    if isinstance(out, tuple | list):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


class TorchEngine(Engine):
    """A checkpoint's UNet in PyTorch, behind the same contract as the exported graphs.

    Inputs ``image`` float32 (N, C, R, R) and ``film`` float32 (N, P); outputs ``logits``
    float32 (N, 1, R, R) and, when the UNet's forward returns ``(mask_logits,
    presence_logits)``, ``presence`` float32 (N, 1), the names of the ONNX image graph.

    Args:
        checkpoint: A .pt path, ``"default"`` or an already loaded
            :class:`promptseg.checkpoint.LoadedCheckpoint`.
        precision: "fp32", or "fp16" on CUDA (autocast).
        device: "cpu", "cuda" or None (CUDA when available).

    Raises:
        ImportError: PyTorch is not installed (names the ``promptseg[train]`` extra).
        InputError: The checkpoint cannot be loaded (one line naming it).
        BackendError: fp16 asked for on a CPU.
    """

    def __init__(self, checkpoint: Any, precision: str = "fp32", device: str | None = None) -> None:
        _import_torch()
        from promptseg.checkpoint import LoadedCheckpoint, load_checkpoint

        if isinstance(checkpoint, LoadedCheckpoint):
            loaded = checkpoint
        else:
            try:
                loaded = load_checkpoint(checkpoint)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise InputError(
                    checkpoint,
                    f"cannot load the checkpoint for the torch backend ({first_line(exc)})",
                ) from exc
        self._setup(loaded.model.unet, precision, device, str(loaded.path))

    @classmethod
    def from_unet(
        cls, unet: Any, precision: str = "fp32", device: str | None = None, source: str = ""
    ) -> TorchEngine:
        """An engine on a UNet module (its ``config`` gives the resolution and channels)."""
        engine = cls.__new__(cls)
        engine._setup(unet, precision, device, source)
        return engine

    def _setup(self, unet: Any, precision: str, device: str | None, source: str) -> None:
        torch = _import_torch()
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"the torch backend runs fp32 or fp16 (CUDA), got {precision!r}")
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if precision == "fp16" and self.device.type != "cuda":
            raise BackendError("the torch backend runs fp16 only on CUDA; use --precision fp32")
        self.unet = unet.eval().to(self.device)
        res, channels = int(unet.config.resolution), int(unet.config.in_channels)
        f32 = np.dtype(np.float32)
        outputs = [TensorSpec(MASK_OUTPUT, ("N", 1, res, res), f32)]
        if self._returns_presence(channels, res):
            outputs.append(TensorSpec(PRESENCE_OUTPUT, ("N", 1), f32))
        super().__init__(
            [
                TensorSpec("image", ("N", channels, res, res), f32),
                TensorSpec("film", ("N", int(unet.film_dim)), f32),
            ],
            outputs,
        )
        self.backend = "torch"
        self.precision = precision
        self.providers = [str(self.device)]
        self.source = source

    def _returns_presence(self, channels: int, res: int) -> bool:
        """Whether the UNet's forward returns a presence output (one probe on zeros)."""
        torch = self.torch
        with torch.inference_mode():
            image = torch.zeros(1, channels, res, res, device=self.device)
            film = torch.zeros(1, int(self.unet.film_dim), device=self.device)
            return _split_output(self.unet(image, film))[1] is not None

    @classmethod
    def from_engine(cls, folder: EngineFolder, precision: str = "fp32") -> TorchEngine:
        """The checkpoint an engine folder was exported from (path and SHA-256 in its manifest)."""
        facts = folder.manifest.get("checkpoint") or {}
        want = facts.get("sha256")
        candidates = [Path(facts["path"])] if facts.get("path") else []
        import promptseg

        candidates.append(Path(promptseg.__file__).with_name("weights") / "default.pt")
        for path in candidates:
            if path.is_file() and (not want or sha256_file(path) == want):
                engine = cls(path, precision)
                engine.folder = folder
                return engine
        raise InputError(
            folder.path / "manifest.json",
            f"the torch backend needs the checkpoint this engine was exported from "
            f"({facts.get('path', '?')}, sha256 {str(want)[:12]}...), which was not found",
        )

    def _run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        image = torch.from_numpy(np.ascontiguousarray(inputs["image"])).to(self.device)
        film = torch.from_numpy(np.ascontiguousarray(inputs["film"])).to(self.device)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.float16, enabled=self.precision == "fp16"),
        ):
            mask, presence = _split_output(self.unet(image, film))
        out = {MASK_OUTPUT: mask.float().cpu().numpy()}
        if presence is not None and len(self.outputs) > 1:
            out[PRESENCE_OUTPUT] = presence.float().reshape(-1, 1).cpu().numpy()
        return out

    def close(self) -> None:
        self.unet = None
