"""Kernels that need a constant filter or weights refuse a model that leaves it out."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.targets.mcu.interpreter import SimulationError, simulate
from tests.targets.mcu._tfl import OPT, B, Net, options


def test_fully_connected_without_weights_names_the_missing_input():
    n = Net()
    x = n.act((1, 4), 0.1, 0)
    y = n.act((1, 2), 0.1, 0)
    n.op(B.FULLY_CONNECTED, [x], [y], OPT.FullyConnectedOptions,
         options("FullyConnectedOptionsT"))  # fmt: skip
    data = n.build([x], [y])
    with pytest.raises(
        SimulationError,
        match=r"FULLY_CONNECTED\) needs its weights as input 1, which is missing; give the",
    ):
        simulate(data, np.zeros((1, 4), np.int8))


def test_conv_2d_without_filter_names_the_missing_input():
    n = Net()
    x = n.act((1, 4, 4, 1), 0.1, 0)
    y = n.act((1, 4, 4, 1), 0.1, 0)
    n.op(B.CONV_2D, [x], [y], OPT.Conv2DOptions, options("Conv2DOptionsT", strideH=1, strideW=1))
    data = n.build([x], [y])
    with pytest.raises(SimulationError, match=r"CONV_2D\) needs its filter as input 1"):
        simulate(data, np.zeros((1, 4, 4, 1), np.int8))
