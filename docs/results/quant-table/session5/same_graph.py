"""Are two exports' graphs the same but for value_info? (initializers bitwise, nodes equal)"""

import sys

import numpy as np
import onnx
from onnx import numpy_helper

for a, b in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
    ma, mb = onnx.load(a + "/model.onnx"), onnx.load(b + "/model.onnx")
    ia = {i.name: numpy_helper.to_array(i) for i in ma.graph.initializer}
    ib = {i.name: numpy_helper.to_array(i) for i in mb.graph.initializer}
    same_init = ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    na = [(n.op_type, list(n.input), list(n.output)) for n in ma.graph.node]
    nb = [(n.op_type, list(n.input), list(n.output)) for n in mb.graph.node]
    print(
        f"{a} vs {b}: initializers equal {same_init} ({len(ia)}), nodes equal {na == nb} "
        f"({len(na)}), value_info {len(ma.graph.value_info)} vs {len(mb.graph.value_info)}",
        flush=True,
    )
