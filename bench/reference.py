"""A faithful reference of the study's notebook pipeline, the baseline every benchmark divides by.

As the published notebook does it (``../shared/reference/README.md``): images loaded one sample at
a time through ``torchvision.datasets.FashionMNIST`` with ``ToTensor`` into numpy arrays, the
stratified 80/20 ``train_test_split(random_state=42)``, scikit-learn ``PCA(n_components=0.95)``
fitted on the training split, ``DataLoader(TensorDataset(...), shuffle=True)`` training of the
same dense networks with the optimizers' default learning rates, the best epoch by validation
accuracy kept, and the unpadded ``paper`` CNN at batch 128. It imports nothing from mlflow.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

GRID = [
    ((64,), "adam", 32),
    ((64,), "adam", 64),
    ((64,), "rmsprop", 32),
    ((64,), "rmsprop", 64),
    ((64, 32), "adam", 32),
    ((64, 32), "adam", 64),
    ((64, 32), "rmsprop", 32),
    ((64, 32), "rmsprop", 64),
]


def load_arrays(root: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The notebook's loading loop: one ToTensor call per sample, appended to Python lists."""
    from torchvision import datasets, transforms

    arrays = []
    for train in (True, False):
        dataset = datasets.FashionMNIST(
            root, train=train, download=False, transform=transforms.ToTensor()
        )
        images, labels = [], []
        for image, label in dataset:
            images.append(image.numpy())
            labels.append(label)
        arrays += [np.array(images).reshape(len(images), -1), np.array(labels)]
    return arrays[0], arrays[1], arrays[2], arrays[3]


def split(x: np.ndarray, y: np.ndarray, seed: int = 42):
    """The notebook's stratified 80/20 split: x_train, x_val, y_train, y_val."""
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)


def split_train(x: np.ndarray, y: np.ndarray, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The training part of the stratified 80/20 split (no PCA: the CNN takes images)."""
    x_train, _, y_train, _ = split(x, y, seed)
    return x_train, y_train


def split_and_project(x: np.ndarray, y: np.ndarray, seed: int = 42):
    """Stratified 80/20 split and PCA(0.95) fitted on the training part."""
    from sklearn.decomposition import PCA

    x_train, x_val, y_train, y_val = split(x, y, seed)
    pca = PCA(n_components=0.95)
    return pca.fit_transform(x_train), pca.transform(x_val), y_train, y_val, pca


def build_dense(n_inputs: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers, width = [], n_inputs
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, 10))


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in loader:
            correct += (model(inputs).argmax(1) == labels).sum().item()
            total += labels.size(0)
    return correct / total


def train_point(
    x_train, y_train, x_val, y_val, hidden, optimizer_name, batch_size, epochs, seed: int = 0
) -> float:
    """Train one grid point the notebook's way; return the best validation accuracy."""
    torch.manual_seed(seed)
    train = DataLoader(
        TensorDataset(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)),
        batch_size=batch_size,
        shuffle=True,
    )
    val = DataLoader(
        TensorDataset(torch.tensor(x_val, dtype=torch.float32), torch.tensor(y_val)),
        batch_size=batch_size,
    )
    model = build_dense(x_train.shape[1], hidden)
    optimizer = (
        torch.optim.Adam(model.parameters())
        if optimizer_name == "adam"
        else torch.optim.RMSprop(model.parameters())
    )
    loss_fn = nn.CrossEntropyLoss()
    best = 0.0
    for _ in range(epochs):
        model.train()
        for inputs, labels in train:
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), labels)
            loss.backward()
            optimizer.step()
        best = max(best, accuracy(model, val))
    return best


def run_dense_grid(
    x_train, y_train, x_val, y_val, epochs: int = 30, seed: int = 0, points=GRID
) -> dict:
    """All grid points in sequence; wall time and the best validation accuracy."""
    start = time.perf_counter()
    scores = {
        f"{'-'.join(map(str, h))}-{o}-bs{b}": train_point(
            x_train, y_train, x_val, y_val, h, o, b, epochs, seed
        )
        for h, o, b in points
    }
    return {
        "seconds": time.perf_counter() - start,
        "best_val_accuracy": max(scores.values()),
        "scores": scores,
    }


class PaperCNN(nn.Module):
    """The notebook's CNN: unpadded 3x3 convs, BN + LeakyReLU, dense head 512-256-128-10."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]

        self.features = nn.Sequential(
            *block(1, 16),
            nn.MaxPool2d(2),
            *block(16, 32),
            *block(32, 64),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        return self.head(self.features(x))


def image_loader(x: np.ndarray, y: np.ndarray, shuffle: bool) -> DataLoader:
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28)
    return DataLoader(TensorDataset(images, torch.tensor(y)), batch_size=128, shuffle=shuffle)


def train_paper_cnn_epoch(model: nn.Module, optimizer, loader: DataLoader) -> float:
    """One training epoch the notebook's way; its seconds."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for inputs, labels in loader:
        optimizer.zero_grad()
        loss_fn(model(inputs), labels).backward()
        optimizer.step()
    return time.perf_counter() - start


def time_paper_cnn_epoch(
    x_train: np.ndarray, y_train: np.ndarray, seed: int = 0, limit: int | None = None
) -> dict:
    """Seconds for one training epoch of the paper CNN at batch 128 through a DataLoader."""
    torch.manual_seed(seed)
    n = len(y_train) if limit is None else min(limit, len(y_train))
    model = PaperCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    seconds = train_paper_cnn_epoch(model, optimizer, image_loader(x_train[:n], y_train[:n], True))
    return {"seconds": seconds, "images": n, "images_per_second": n / seconds}


def run_paper_cnn(arrays, epochs: int = 10, seed: int = 0, limit: int | None = None) -> dict:
    """The notebook's CNN run: ``epochs`` epochs of Adam at batch 128 on the 80% split, the best
    epoch by validation accuracy kept and scored on the test set; seconds of each training epoch
    and of the whole run (validation and test included)."""
    x, y, x_test, y_test = arrays
    x_train, x_val, y_train, y_val = split(x, y)
    n = len(y_train) if limit is None else min(limit, len(y_train))
    torch.manual_seed(seed)
    started = time.perf_counter()
    train = image_loader(x_train[:n], y_train[:n], True)
    val, test = image_loader(x_val, y_val, False), image_loader(x_test, y_test, False)
    model = PaperCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    epoch_seconds, best, best_state = [], -1.0, None
    for _ in range(epochs):
        epoch_seconds.append(train_paper_cnn_epoch(model, optimizer, train))
        if (score := accuracy(model, val)) > best:
            best, best_state = score, {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {
        "epoch_seconds": epoch_seconds,
        "seconds": time.perf_counter() - started,
        "best_val_accuracy": best,
        "test_accuracy": accuracy(model, test),
        "images": n,
    }
