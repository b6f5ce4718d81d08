"""Serving: how a request reaches the model.

`predictor.Predictor` loads a saved or registered model and predicts images, folders and lists;
`pyfunc.L2RCLIPModel` wraps it as the MLflow pyfunc that `mlflow models serve` runs (logged as
"models from code" through `served_model.py`); `registry` keeps the registered versions and the
`champion` alias.

`L2RCLIPModel` stays importable from here: models registered before the package was grouped by
role name `l2rclip.serving.L2RCLIPModel` in their logged code.
"""

from l2rclip.serving.pyfunc import L2RCLIPModel

__all__ = ["L2RCLIPModel"]
