"""Datasets (the packed Fashion-MNIST subset in ``assets/``, MNIST, CIFAR, image folders,
synthetic), transforms and per-rank loaders."""
