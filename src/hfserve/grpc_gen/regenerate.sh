#!/usr/bin/env bash
# Regenerate the Python gRPC/protobuf modules from grpc_predict_v2.proto.
#
# Needs grpcio-tools (pip install grpcio-tools; it is in the "test" extra).
# The protobuf runtime must be at least the version of protoc bundled with the
# grpcio-tools that generated the files (the generated _pb2.py checks it).
# Usage: src/hfserve/grpc_gen/regenerate.sh   (from anywhere)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"

cd "$here"
"$python" -m grpc_tools.protoc \
    --proto_path=. \
    --python_out=. \
    --pyi_out=. \
    --grpc_python_out=. \
    grpc_predict_v2.proto

# protoc writes an absolute "import grpc_predict_v2_pb2" into the gRPC module;
# make it relative so it works inside the hfserve.grpc_gen package.
sed -i.bak -E 's/^import grpc_predict_v2_pb2 as /from . import grpc_predict_v2_pb2 as /' grpc_predict_v2_pb2_grpc.py
rm -f grpc_predict_v2_pb2_grpc.py.bak

grep -q '^from \. import grpc_predict_v2_pb2 as ' grpc_predict_v2_pb2_grpc.py || {
    echo "regenerate.sh: could not fix the import in grpc_predict_v2_pb2_grpc.py" >&2
    exit 1
}
echo "regenerated in $here with $("$python" -m grpc_tools.protoc --version)"
