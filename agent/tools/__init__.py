"""Tools: the command line, the API client, the demo and the backtest."""
