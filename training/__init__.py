"""pairforge training: fit a label-map -> image model on the user's pairs (``pairforge train``).

``training.data`` reads and caches pairs (versions through the verified reader, or folders), ``training.loop`` trains
the from-scratch route with checkpoints and exports a model folder, ``training.finetune`` fine-tunes a diffusers
ControlNet (route 2). Rendering with a trained model is ``generators.learned``. No Prefect here: ``flows.train``
orchestrates these calls.
"""
