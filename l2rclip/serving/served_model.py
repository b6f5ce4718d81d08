"""The served l2rclip pyfunc as MLflow "models from code" (logged by `l2rclip.serving.pyfunc.log_pyfunc`).

MLflow copies this file into the logged model and runs it when the model is loaded, after putting
the model's `code/` folder (the l2rclip package, logged as `code_paths`) first on `sys.path`; it
imports that l2rclip and nothing else, so loading a registered model unpickles no code.
It is not meant to be imported: it exists to be logged.
"""

from mlflow.models import set_model

from l2rclip.serving.pyfunc import L2RCLIPModel

set_model(L2RCLIPModel())
