"""Data modules: every one delivers normalised ``(images, labels)`` batches and three splits
(``train``; ``arch``, carved from the training set; ``test``). See :mod:`nas.data.base`.

Configs name them by these short paths (``_target_: nas.data.DigitsDataModule``)."""
from nas.data.base import ImageDataModule, TransformedDataset, split_train_arch
from nas.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from nas.data.digits import DigitsDataModule
from nas.data.fashion_mnist import FashionMNISTDataModule
from nas.data.imagefolder import ImageFolderDataModule
from nas.data.synth import TexShapesDataModule

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "DigitsDataModule", "FashionMNISTDataModule", "ImageDataModule",
           "ImageFolderDataModule", "TexShapesDataModule", "TransformedDataset", "split_train_arch"]
