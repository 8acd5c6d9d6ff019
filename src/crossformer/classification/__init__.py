"""Image classification: train, evaluate and predict (the Python API behind the commands).

Example::

    from crossformer.classification import resolve_config, train, evaluate, predict
    config = resolve_config(model="crossformer_tiny", overrides={"data.root": "/data/imagenet", "run.output": "runs/t"})
    train(config)
    print(evaluate("runs/t/best.pth", "/data/imagenet"))
    print(predict(["cat.jpg"], "runs/t/best.pth", topk=5))
"""

from ..lazy import export_lazily

# Imported on first use: the command line reads its flags from .config alone, the rest needs torch.
__all__ = export_lazily(__name__, {
    ".config": ("ClassificationConfig", "TrainConfig", "bundled_configs", "resolve_config"),
    ".task": ("ClassificationTask", "train"),
    ".evaluate": ("evaluate",),
    ".predict": ("predict", "Prediction"),
    ".model": ("create_classifier", "load_classifier", "LoadedClassifier"),
})
