"""The wire API between controller and agents: protobuf definitions compiled by grpcio-tools.

The .proto files under controller/api/proto/ are the source; `make setup` (and a wheel
build) compiles them into controller/api/gen/, which is never edited by hand nor committed.
"""
