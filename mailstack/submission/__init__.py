"""The mail submission agent: SMTP submission (RFC 6409) with STARTTLS, implicit TLS and AUTH."""
