"""Quality control for the radiographer: typed alerts, the alert bus, alert logs."""
