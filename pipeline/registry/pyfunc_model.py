"""The registered model, as an MLflow "model from code" (logged by pipeline.registry.tracking.register_model).

MLflow stores this file's source, not a pickle: loading builds `kpp.model.KanervaPlusPlus` from the config JSON
artifact and loads the state_dict artifact with `weights_only=True`, so loading never runs pickled code. Any
batch size works (the torch.export format would freeze it).

predict(episodes) takes float episodes [E, T, C, H, W] in [0, 1] (numpy) and returns the per-image negative ELBO
[E, T] in nats, computed with the memory written from each image's own episode; params={"seed": s} fixes the
sampling draws (default 0), so the same input gives the same numbers in any process.
The torch module itself: `mlflow.pyfunc.load_model(uri).unwrap_python_model().model`.
"""
import json

import mlflow
import numpy as np
import torch


class KanervaPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from kpp.config import KanervaConfig
        from kpp.model import KanervaPlusPlus
        with open(context.artifacts["config"]) as f:
            cfg = KanervaConfig.from_dict(json.load(f))
        self.model = KanervaPlusPlus(cfg)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    # np.ndarray: MLflow then infers no schema from the hint (the logged signature is the schema: 5-D float
    # episodes) and does not warn about a missing hint on every load
    def predict(self, context, model_input: np.ndarray, params=None):
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        seed = int((params or {}).get("seed", 0))
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            out = self.model(x, beta=1.0)
        return out["total"].numpy()


mlflow.models.set_model(KanervaPyfunc())
