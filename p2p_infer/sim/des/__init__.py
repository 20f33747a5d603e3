"""The discrete-event engine: the real proto/ machines on a virtual clock (issue 13)."""
