"""Network simulations: scenarios, the process and discrete-event engines, reports (issue 13)."""
