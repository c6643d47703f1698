"""The Embed reply built from the array's bytes is the very message built from Python floats."""

from __future__ import annotations

import numpy as np
import pytest

from fastserve.inference.v1 import inference_pb2 as pb
from fastserve.services.inference.servicer import embed_reply


@pytest.mark.parametrize("shape", [(1, 384), (3, 384), (2, 1), (4, 40), (1, 2000)])
def test_embed_reply_equals_the_float_built_message(shape):
    outputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = pb.EmbedResponse(embeddings=[pb.Embedding(values=row) for row in outputs.tolist()],
                                dimension=shape[1], prompt_tokens=17)
    assert embed_reply(outputs, 17) == expected


def test_embed_reply_takes_other_float_dtypes_and_strided_arrays():
    outputs = np.random.default_rng(1).standard_normal((6, 8))  # float64, read as float32 on the wire
    reply = embed_reply(outputs[::2], 3)
    assert reply.dimension == 8 and len(reply.embeddings) == 3
    assert np.array_equal(np.array([e.values for e in reply.embeddings], dtype=np.float32),
                          outputs[::2].astype(np.float32))
