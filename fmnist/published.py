"""The study's published numbers (Saraswat, Challur, Pitta) as data: Table I, headline accuracies,
per-class F1 and where its text disagrees with its numbers or notebook.
"""

from __future__ import annotations

# Table I: (hidden layers, optimizer, batch size) -> validation accuracy in %.
TABLE_I: dict[tuple[tuple[int, ...], str, int], float] = {
    ((64,), "adam", 32): 89.74,
    ((64,), "adam", 64): 89.58,
    ((64,), "rmsprop", 32): 87.85,
    ((64,), "rmsprop", 64): 88.44,
    ((64, 32), "adam", 32): 89.17,
    ((64, 32), "adam", 64): 89.58,
    ((64, 32), "rmsprop", 32): 88.01,
    ((64, 32), "rmsprop", 64): 88.73,
}

HEADLINE = {
    "dnn_val_accuracy": 0.8974,
    "dnn_test_accuracy": 0.89,
    "cnn_val_accuracy": 0.9077,
    "cnn_test_accuracy": 0.90,
    "pca_components_90": 87,
    "pca_components_95": 187,
    "tsne_samples": 5000,
}

# Per-class F1 of the study's classification reports, in CLASS_NAMES order.
DNN_F1 = (0.83, 0.98, 0.80, 0.89, 0.82, 0.96, 0.70, 0.95, 0.97, 0.96)
CNN_F1 = (0.85, 0.98, 0.85, 0.90, 0.84, 0.96, 0.73, 0.93, 0.97, 0.95)

# Where the study's text disagrees with its own tables or with its published notebook.
DISCREPANCIES: tuple[str, ...] = (
    "The text says T-shirt, Pullover, Dress and Shirt reach F1 above 0.9 with the dense network; "
    "its own report gives 0.83, 0.80, 0.89 and 0.70 (Shirt is the weakest class).",
    "The text calls Sandal and Sneaker weak classes; its own report gives them F1 0.96 and 0.95.",
    "The text says 87 components explain about 90% of the variance; the measured count on the "
    "training split is reported beside it by the EDA run.",
    "The text gives a learning rate of 0.001 for both optimizers; the notebook runs RMSprop with "
    "its PyTorch default 0.01.",
    "The text says the CNN convolutions use padding that keeps the spatial size; the notebook's "
    "convolutions have no padding (28 -> 26 -> 13 -> 11 -> 9 -> 4 -> 2, flattened to 512).",
    "The text says L2 regularisation is used; the notebook sets no weight decay.",
    "The text calls the best network a 3-layer model; Table I lists it with 2 layers.",
    "The text flattens images into a 786-pixel vector; a 28x28 image has 784 pixels.",
)
