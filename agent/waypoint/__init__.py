"""The L7 waypoint: weft's HTTP/1.1, HTTP/2 and gRPC proxy for model services."""
