"""More model families, tried as a new user would: every softmax rewritten, the output unchanged.

Tiny configs with eager attention; compiled without inductor to keep the run short (the
inductor path is covered by test_models.py).
"""
import pytest
from test_models import DEVICE, CountSoftmax

from flashfuse.testing import assert_equivalent, models


@pytest.mark.parametrize("family", sorted(set(models.FAMILIES) - set(models.CORE)))
def test_family_is_rewritten_and_equivalent(family):
    model, inputs = models.build(family, device=DEVICE)
    names, values = list(inputs), list(inputs.values())

    def call(*args):
        return models.first_output(model(**dict(zip(names, args))))
    with CountSoftmax() as counter:
        call(*values)
    expected = counter.calls - models.ROUTERS.get(family, 0)  # a router's softmax is not attention
    assert_equivalent(call, *values, expected_sites=expected, grad=False, options={"compiler": "eager"})
