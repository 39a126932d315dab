"""guardianctl, the security team's and operators' CLI on the admin socket: one module per
command group."""
