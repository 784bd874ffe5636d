"""Run circuit-tracer's own loaders and forward passes on an exported folder (interop venv).

    .venv-interop/bin/python scripts/interop/circuit_tracer_check.py IN_DIR INPUTS.npz OUT.npz [...]

IN_DIR is a circuit-tracer folder (`config.yaml` + `layer_{i}.safetensors` for a transcoder
set, or `W_enc_{i}` / `W_dec_{i}.safetensors` for a cross-layer transcoder). It is loaded the
way a user loads a local folder: `load_transcoder_from_hub(<absolute path>)`, which finds the
`config.yaml` there (circuit-tracer's cache layout) and calls `load_transcoder_set` or
`load_clt` with lazy decoders; a second, eager load (`lazy_decoder=False`, every tensor
shape-checked by `load_state_dict`) must give the same outputs. INPUTS.npz holds `x`
[n_layers, n_pos, d_model] float32: the feature-input activations of every layer.

OUT.npz gets, all float32 with L = n_layers, n = n_pos, F = d_transcoder, D = d_model:
    pre       [L, n, F]  `encode_layer(x[l], l, apply_activation_function=False)`
    features  [L, n, F]  `encode(x)` (all layers at once)
    decode    [L, n, D]  `decode(features, x)` (reconstruction of every output layer, skip
                         included; for a CLT the sum over all source layers <= l)
    attr_reconstruction [L, n, D]  `compute_attribution_components(x, zero_positions=
                         slice(0, 0))["reconstruction"]`, the sparse path attribution uses
    skip      [L, n, D]  `compute_skip(l, x[l])` (transcoder sets with W_skip only)
    info      a JSON string: class, n_layers, d_transcoder, d_model, activation, bandwidth,
              skip, hooks, scan

More triples IN_DIR INPUTS.npz OUT.npz may follow (one process, one torch import).
This script runs in the interop virtualenv and must not import gemmascope_jax or jax.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder must never touch the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from circuit_tracer.transcoder.activation_functions import JumpReLU  # noqa: E402
from circuit_tracer.transcoder.cross_layer_transcoder import (  # noqa: E402
    CrossLayerTranscoder,
    load_clt,
)
from circuit_tracer.transcoder.single_layer_transcoder import (  # noqa: E402
    TranscoderSet,
    load_transcoder_set,
)
from circuit_tracer.utils.hf_utils import load_transcoder_from_hub  # noqa: E402

CPU = torch.device("cpu")


def load(in_dir: Path, *, lazy: bool):
    """Lazy: the user path (`load_transcoder_from_hub` on the absolute folder path). Eager:
    the underlying loader with every tensor read up front."""
    config = yaml.safe_load((in_dir / "config.yaml").read_text())
    kind = config["model_kind"]
    if lazy:
        obj, _ = load_transcoder_from_hub(
            str(in_dir), device=CPU, dtype=torch.float32, lazy_encoder=False, lazy_decoder=True
        )
    elif kind == "transcoder_set":
        paths = {
            int(p.stem.split("_")[1]): str(p) for p in sorted(in_dir.glob("layer_*.safetensors"))
        }
        obj = load_transcoder_set(
            paths,
            scan=str(in_dir),
            feature_input_hook=config["feature_input_hook"],
            feature_output_hook=config["feature_output_hook"],
            device=CPU,
            dtype=torch.float32,
            lazy_encoder=False,
            lazy_decoder=False,
        )
    else:
        obj = load_clt(
            str(in_dir),
            feature_input_hook=config["feature_input_hook"],
            feature_output_hook=config["feature_output_hook"],
            scan=str(in_dir),
            device=CPU,
            dtype=torch.float32,
            lazy_decoder=False,
            lazy_encoder=False,
        )
    expected = {"transcoder_set": TranscoderSet, "cross_layer_transcoder": CrossLayerTranscoder}
    if not isinstance(obj, expected[kind]):
        raise SystemExit(f"{in_dir}: model_kind {kind} loaded as {type(obj).__name__}")
    return obj


def run(obj, x: torch.Tensor) -> dict[str, np.ndarray]:
    n_layers, n_pos, d_model = x.shape
    if obj.n_layers != n_layers:
        raise SystemExit(f"loaded {obj.n_layers} layers, inputs have {n_layers}")
    out = {}
    with torch.no_grad():
        out["pre"] = torch.stack(
            [obj.encode_layer(x[i], i, apply_activation_function=False) for i in range(n_layers)]
        )
        features = obj.encode(x)
        out["features"] = features
        out["decode"] = obj.decode(features, x)
        parts = obj.compute_attribution_components(x, zero_positions=slice(0, 0))
        out["attr_reconstruction"] = parts["reconstruction"]
        if isinstance(obj, TranscoderSet) and obj.skip_connection:
            out["skip"] = torch.stack([obj.compute_skip(i, x[i]) for i in range(n_layers)])
    for name in ("decode", "attr_reconstruction"):
        # circuit-tracer's CLT sizes its reconstruction by the last position with an active
        # feature, so inputs need an active feature at the last position.
        if tuple(out[name].shape) != (n_layers, n_pos, d_model):
            raise SystemExit(
                f"{name} has shape {tuple(out[name].shape)}, expected {(n_layers, n_pos, d_model)}"
            )
    return {k: v.detach().to(torch.float32).numpy() for k, v in out.items()}


def info(obj) -> dict:
    if isinstance(obj, TranscoderSet):
        act = obj[0].activation_function
        d_model, skip = obj[0].d_model, obj.skip_connection
    else:
        act = obj.activation_function
        d_model, skip = obj.d_model, obj.W_skip is not None
    return {
        "class": type(obj).__name__,
        "n_layers": obj.n_layers,
        "d_transcoder": obj.d_transcoder,
        "d_model": d_model,
        "activation": "jumprelu" if isinstance(act, JumpReLU) else getattr(act, "__name__", "?"),
        "bandwidth": act.bandwidth if isinstance(act, JumpReLU) else None,
        "skip": skip,
        "feature_input_hook": obj.feature_input_hook,
        "feature_output_hook": obj.feature_output_hook,
        "scan": obj.scan,
    }


def check(in_dir: Path, inputs: Path, out_path: Path) -> None:
    x = torch.from_numpy(np.load(inputs)["x"].astype(np.float32))
    lazy = load(in_dir, lazy=True)
    results = run(lazy, x)
    eager_results = run(load(in_dir, lazy=False), x)
    for name, value in results.items():
        if not np.array_equal(value, eager_results[name]):
            raise SystemExit(f"{in_dir}: lazy and eager loads disagree on {name}")
    np.savez(out_path, **results, info=np.array(json.dumps(info(lazy))))


def main(argv: list[str]) -> None:
    """One or more IN_DIR INPUTS.npz OUT.npz triples (one process saves the torch import)."""
    if not argv or len(argv) % 3:
        raise SystemExit(__doc__)
    for i in range(0, len(argv), 3):
        check(Path(argv[i]).resolve(), Path(argv[i + 1]), Path(argv[i + 2]))


if __name__ == "__main__":
    main(sys.argv[1:])
