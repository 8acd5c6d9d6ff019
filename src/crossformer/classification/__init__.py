"""Image classification: train, evaluate and predict (the Python API behind the commands).

Example::

    from crossformer.classification import resolve_config, train, evaluate, predict
    config = resolve_config(model="crossformer_tiny", overrides={"data": "/data/imagenet", "output": "runs/t"})
    train(config)
    print(evaluate("runs/t/best.pth", "/data/imagenet"))
    print(predict(["cat.jpg"], "runs/t/best.pth", topk=5))
"""

from .config import TrainConfig, bundled_configs, resolve_config
from .evaluate import evaluate
from .model import LoadedClassifier, create_classifier, load_classifier
from .predict import Prediction, predict
from .trainer import train

__all__ = [
    "TrainConfig", "bundled_configs", "resolve_config",
    "train", "evaluate", "predict", "Prediction",
    "create_classifier", "load_classifier", "LoadedClassifier",
]
