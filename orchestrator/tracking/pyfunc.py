"""The MLflow pyfunc for a registered Flow++ model, logged as *code*, not a pickle.

``mlflow.pyfunc.load_model(uri).unwrap_python_model().model`` is a FlowPlusPlus
with ``sample`` and ``log_prob``, rebuilt from ``config.json`` and EMA weights in
``weights.safetensors``. ``predict`` scores uint8 images (N, C, H, W) in bits/dim.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class FlowPPModel(PythonModel):
    def load_context(self, context):
        from orchestrator.tracking.models import build_from_files  # lazy: MLflow loads this file as code, alone

        self.model = build_from_files(context.artifacts["weights"], context.artifacts["config"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.int64))
        with torch.no_grad():
            return self.model.bits_per_dim(x).numpy()


mlflow.models.set_model(FlowPPModel())
