#!/usr/bin/env bash
# Generates the Python gRPC stubs for Cordon's API from proto/ into a directory (default: cordon_pb next
# to this script). The output is a package root: put it on sys.path and `from cordon.v1 import
# cordon_pb2, cordon_pb2_grpc` works. Needs grpcio-tools (`python3 -m pip install grpcio-tools`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$here/../../proto"
out="${1:-$here/cordon_pb}"

if ! python3 -c "import grpc_tools" 2>/dev/null; then
  echo "generate.sh: grpc_tools is missing; install it with: python3 -m pip install grpcio-tools" >&2
  exit 1
fi
mkdir -p "$out"
# google/protobuf/timestamp.proto comes with grpc_tools; the generated code imports it from protobuf.
python3 -m grpc_tools.protoc -I "$proto" --python_out="$out" --grpc_python_out="$out" \
  "$proto/cordon/v1/cordon.proto"
# The stubs import `cordon.v1.cordon_pb2`, so both levels must be packages.
touch "$out/cordon/__init__.py" "$out/cordon/v1/__init__.py"
echo "generate.sh: stubs in $out"
