"""Weight watermarking: keyed projection watermarks, signed certificates, verification."""
