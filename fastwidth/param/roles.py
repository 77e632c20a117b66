"""The µP roles (Role, Init, HasRoles): defined in fastwidth/nn/roles.py, where the layers that
assign them sit below param/ in the layer order; re-exported here under their first path."""
from fastwidth.nn.roles import HasRoles, Init, Role

__all__ = ["HasRoles", "Init", "Role"]
