"""A keyword-spotting network built from speechbrain.nnet layers."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["KWSNet"]


class KWSNet(nn.Module):
    """A small keyword-spotting CNN of speechbrain layers: log-mel frames in, class logits out.

    A 2-D convolution over (time, frequency) with stride 2 along frequency, then dilated 1-D
    convolutions over time (each ``speechbrain.nnet.CNN.Conv1d`` + ``BatchNorm1d`` + ReLU), mean
    and standard deviation over time (``StatisticsPooling``) and two ``speechbrain.nnet.linear.Linear``.

    Args:
        n_mels: input features per frame.
        n_classes: output classes.
        channels: width of the 1-D convolutions.

    Shapes:
        ``(B, T, n_mels)`` -> ``(B, n_classes)``.

    Example:
        >>> import torch
        >>> KWSNet(n_mels=40, n_classes=10, channels=32)(torch.randn(2, 101, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(self, n_mels: int = 40, n_classes: int = 10, channels: int = 64) -> None:
        super().__init__()
        from speechbrain.nnet.CNN import Conv1d, Conv2d
        from speechbrain.nnet.linear import Linear
        from speechbrain.nnet.normalization import BatchNorm1d, BatchNorm2d
        from speechbrain.nnet.pooling import StatisticsPooling

        self.conv2d = Conv2d(out_channels=8, kernel_size=(3, 3), stride=(2, 1), in_channels=1, padding="valid")
        self.bn2d = BatchNorm2d(input_size=8)
        width = 8 * ((n_mels - 3) // 2 + 1)  # speechbrain's stride is (frequency, time)
        blocks = []
        for i, dilation in enumerate((1, 2, 3)):
            blocks += [
                Conv1d(channels, 3, in_channels=width if i == 0 else channels, dilation=dilation),
                BatchNorm1d(input_size=channels),
                nn.ReLU(),
            ]
        self.tdnn = nn.Sequential(*blocks)
        self.pool = StatisticsPooling()
        self.fc1 = Linear(channels, input_size=2 * channels)
        self.fc2 = Linear(n_classes, input_size=channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2d(self.conv2d(x.unsqueeze(-1))).relu()  # (B, T, F) -> (B, T - 2, (F - 3) // 2 + 1, 8)
        x = self.tdnn(x.flatten(2))  # -> (B, T - 2, channels)
        x = self.pool(x).squeeze(1)  # (B, 2 * channels): mean and std over time
        return self.fc2(self.fc1(x).relu())  # (B, n_classes)
