"""Image classification: train, evaluate and predict (the Python API behind the commands).

Example::

    from crossformer.classification import resolve_config, train, evaluate, predict
    config = resolve_config(model="crossformer_tiny", overrides={"data.root": "/data/imagenet", "run.output": "runs/t"})
    train(config)
    print(evaluate("runs/t/best.pth", "/data/imagenet"))
    print(predict(["cat.jpg"], "runs/t/best.pth", topk=5))
"""

from .config import ClassificationConfig, TrainConfig, bundled_configs, resolve_config
from .evaluate import evaluate
from .model import LoadedClassifier, create_classifier, load_classifier
from .predict import Prediction, predict
from .task import ClassificationTask, train

__all__ = [
    "ClassificationConfig", "ClassificationTask", "TrainConfig", "bundled_configs", "resolve_config",
    "train", "evaluate", "predict", "Prediction",
    "create_classifier", "load_classifier", "LoadedClassifier",
]
