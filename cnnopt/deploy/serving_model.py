"""MLflow pyfunc wrapper over the exported TorchScript file, logged as "model from code".

MLflow copies this file into the logged model, so loading it (`mlflow.pyfunc.load_model`, `mlflow
models serve`) needs torch and mlflow, not cnnopt. Input: uint8 images (N, C, H, W) as a numpy array;
output: class probabilities (N, num_classes).
"""

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


class TorchScriptClassifier(PythonModel):
    def load_context(self, context):
        self.model = torch.jit.load(context.artifacts["model.pt"])
        self.class_names = list(self.model.class_names)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.uint8))
        with torch.no_grad():
            return self.model(images).numpy()


set_model(TorchScriptClassifier())
