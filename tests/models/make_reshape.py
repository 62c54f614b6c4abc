"""Writes tests/models/reshape-2x2.onnx: a model whose inference fails for
some valid-looking inputs, to test how workers handle failing inferences.

Input "x" is float32 [N] with N free; the model reshapes it to [2, 2], so
N = 4 works and any other N fails inside the runtime, after the request
passed every check a worker can make before running the model.

    .venv/bin/python tests/models/make_reshape.py
"""

import pathlib

import onnx
from onnx import TensorProto, helper

HERE = pathlib.Path(__file__).resolve().parent


def main() -> None:
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape-2x2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        initializer=[shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, HERE / "reshape-2x2.onnx")


if __name__ == "__main__":
    main()
