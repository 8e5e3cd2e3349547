"""Networks: building torchvision and timm classifiers, their starting weights, model surgery
(head, freezing), checkpoints, the one inference path and exports. Imports ``data`` and below."""
