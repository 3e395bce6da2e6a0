"""Generated Open Inference Protocol (KServe v2) gRPC modules.

``grpc_predict_v2.proto`` is KServe's ``python/kserve/kserve/protocol/grpc/grpc_predict_v2.proto``
(package ``inference``, service ``GRPCInferenceService``). The ``_pb2`` modules are generated
from it by ``regenerate.sh``; do not edit them by hand.
"""

from . import grpc_predict_v2_pb2 as pb2
from . import grpc_predict_v2_pb2_grpc as pb2_grpc

__all__ = ["pb2", "pb2_grpc"]
