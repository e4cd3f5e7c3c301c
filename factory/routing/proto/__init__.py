"""Protocol buffers of the online API (generated code checked in; see factory_api.proto)."""
