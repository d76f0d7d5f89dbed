"""Grid signals from outside the site: the OpenADR 2.0b VEN."""
