# ota_tls.py: TLS for ota_http.py, imported only for an https:// url (a board
# needs tens of KB more for it: an ESP32, not an ESP8266).

from ota import OTAError


def wrap_socket(s, host, ca, where):
    # Boards freeze micropython-lib's ssl.py over the tls module; a bare unix build
    # has only tls; 1.20 has ssl.wrap_socket alone. A board has no authorities of
    # its own: without ca it encrypts but cannot tell the server is the right one.
    try:
        try:
            import ssl
        except ImportError:
            import tls as ssl
        if not hasattr(ssl, "SSLContext"):
            return ssl.wrap_socket(s, server_hostname=host, cert_reqs=2 if ca else 0, cadata=ca)
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca:
            c.verify_mode = ssl.CERT_REQUIRED
            try:
                c.load_verify_locations(cadata=ca)
            except TypeError:  # the bare tls module takes it by position
                c.load_verify_locations(ca)
        elif hasattr(c, "load_default_certs"):
            c.load_default_certs()  # CPython: the system's authorities
        else:
            c.verify_mode = ssl.CERT_NONE
        return c.wrap_socket(s, server_hostname=host)
    except (MemoryError, OSError, ValueError) as e:
        s.close()
        if isinstance(e, MemoryError) or e.args[0] == 12:  # ENOMEM: mbedtls could not allocate
            raise OTAError("%s: not enough memory for TLS on this board: use http://" % where)
        raise OTAError("%s: TLS failed: %s" % (where, e))
