"""A check shared by the kernel tests: a custom op registers correctly and a module calling it
traces through torch.compile(fullgraph=True) and torch.export with the eager result."""

import torch


def _grad_leaf(x):
    if isinstance(x, list):
        return [_grad_leaf(t) for t in x]
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().clone().requires_grad_()
    return x


class _Calls(torch.nn.Module):
    """``forward(*inputs) = fn(model, *inputs)``: a module to compile and export."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *inputs):
        return self.fn(self.model, *inputs)


def assert_op_traces(op, op_args, model, fn, inputs, *, differentiable=True):
    """``torch.library.opcheck`` of ``op`` on ``op_args`` (floating tensors become leaves that
    require grad: schema, fake tensor, autograd registration, AOT dispatch; an op that is not
    ``differentiable`` gets its arguments as they are and no autograd check), then
    ``fn(model, *inputs)`` compiled with ``fullgraph=True`` and exported with ``torch.export``
    gives the eager scores, with ``op`` in the exported graph."""
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if differentiable:
        op_args, checks = tuple(_grad_leaf(x) for x in op_args), (*checks, "test_autograd_registration")
    torch.library.opcheck(op, tuple(op_args), test_utils=checks)
    module = _Calls(model, fn)
    expected = module(*inputs).detach()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), expected)
    exported = torch.export.export(module, tuple(inputs))
    assert any(node.target == op for node in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(*inputs), expected)
