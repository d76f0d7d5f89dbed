"""The control room: the loop, the fleet of devices, safe ordering, inventory, prices, alarms."""
