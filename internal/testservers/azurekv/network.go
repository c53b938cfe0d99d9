package azurekv

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/runtime"
)

// Network serves this STAND-IN to other processes (a `kubekms serve` under
// test), which reach it the way a client in a locked-down network reaches
// Key Vault, with no change to the key URI and nothing but environment
// variables the real SDK honours:
//
//   - HTTPS_PROXY: a CONNECT proxy on 127.0.0.1 that accepts tunnels to the
//     vault's host only and terminates them itself, with a certificate for
//     that host from a private CA;
//   - SSL_CERT_FILE: that CA, so the plugin verifies the vault's certificate;
//   - IDENTITY_ENDPOINT and IDENTITY_HEADER: a managed identity token
//     endpoint on 127.0.0.1 (App Service's protocol, which azidentity's
//     ManagedIdentityCredential uses when they are set).
//
// Requests that arrive through the tunnel go to the SDK's fake server
// (Transport), so the two faces share one state: the test's in-process
// AdminClient rotates and disables what the plugin sees. A request whose
// bearer token is not the one the identity endpoint issued gets 401.
type Network struct {
	s        *Server
	host     string // the vault's host name
	leaf     tls.Certificate
	dir      string
	token    string
	idSecret string
	idURL    string

	mu    sync.Mutex
	addr  string // the proxy's address, kept across Stop and Start
	ln    net.Listener
	conns map[net.Conn]struct{}
	done  chan struct{}
}

// Serve starts the proxy and the identity endpoint, stopped when t ends.
func (s *Server) Serve(t testing.TB) *Network {
	t.Helper()
	u, err := url.Parse(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	n := &Network{s: s, host: u.Hostname(), dir: t.TempDir(), token: randomHex(t), idSecret: randomHex(t), conns: map[net.Conn]struct{}{}}
	if n.leaf, err = n.writeCA(); err != nil {
		t.Fatalf("stand-in CA: %v", err)
	}
	id, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	n.idURL = "http://" + id.Addr().String() + "/msi/token"
	idSrv := &http.Server{Handler: http.HandlerFunc(n.identity), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = idSrv.Serve(id) }()
	t.Cleanup(func() { _ = idSrv.Close() })
	n.listen(t, "127.0.0.1:0")
	t.Cleanup(n.closeProxy)
	return n
}

// Env is the environment of a process that should reach this vault.
func (n *Network) Env() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return []string{
		"HTTPS_PROXY=http://" + n.addr, "https_proxy=http://" + n.addr,
		"NO_PROXY=127.0.0.1,localhost", "no_proxy=127.0.0.1,localhost",
		"SSL_CERT_FILE=" + filepath.Join(n.dir, "ca.pem"), "SSL_CERT_DIR=" + n.dir,
		"IDENTITY_ENDPOINT=" + n.idURL, "IDENTITY_HEADER=" + n.idSecret,
		// No other credential source may take over.
		"AZURE_FEDERATED_TOKEN_FILE=", "AZURE_CLIENT_ID=", "AZURE_TENANT_ID=", "MSI_ENDPOINT=", "IMDS_ENDPOINT=", "IDENTITY_SERVER_THUMBPRINT=",
	}
}

// Stop makes the vault unreachable from other processes: the proxy stops
// listening (connection refused) and drops its open tunnels.
func (n *Network) Stop(testing.TB) { n.closeProxy() }

// Start brings the proxy back on the same address.
func (n *Network) Start(t testing.TB) {
	t.Helper()
	n.mu.Lock()
	addr := n.addr
	n.mu.Unlock()
	n.listen(t, addr)
}

func (n *Network) listen(t testing.TB, addr string) {
	t.Helper()
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if ln, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("stand-in proxy: %v", err)
	}
	done := make(chan struct{})
	n.mu.Lock()
	n.ln, n.addr, n.done = ln, ln.Addr().String(), done
	n.mu.Unlock()
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if !n.track(c, true) {
				_ = c.Close()
				continue
			}
			go n.tunnel(c)
		}
	}()
}

func (n *Network) closeProxy() {
	n.mu.Lock()
	ln, done := n.ln, n.done
	n.ln = nil
	for c := range n.conns {
		_ = c.Close()
	}
	clear(n.conns)
	n.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
		<-done
	}
}

// track adds (or removes) an open connection; false when the proxy is
// stopped.
func (n *Network) track(c net.Conn, add bool) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !add {
		delete(n.conns, c)
		return true
	}
	if n.ln == nil {
		return false
	}
	n.conns[c] = struct{}{}
	return true
}

// tunnel answers one CONNECT to the vault's host, then serves HTTP over
// TLS on the tunnel.
func (n *Network) tunnel(c net.Conn) {
	defer n.track(c, false)
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	if req.Method != http.MethodConnect || req.Host != n.host+":443" {
		_, _ = io.WriteString(c, "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
		return
	}
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		return
	}
	_ = c.SetDeadline(time.Time{})
	tc := tls.Server(&bufferedConn{Conn: c, r: br}, &tls.Config{Certificates: []tls.Certificate{n.leaf}, MinVersion: tls.VersionTLS12})
	srv := &http.Server{Handler: http.HandlerFunc(n.vault), ReadHeaderTimeout: 10 * time.Second}
	_ = srv.Serve(&oneConnListener{c: tc, done: make(chan struct{})})
}

// vault hands a request from the tunnel to the SDK's fake server.
func (n *Network) vault(w http.ResponseWriter, r *http.Request) {
	if a := r.Header.Get("Authorization"); a != "" && subtle.ConstantTimeCompare([]byte(a), []byte("Bearer "+n.token)) != 1 {
		w.Header().Set("WWW-Authenticate", `Bearer authorization="https://login.microsoftonline.com/tenant" resource="https://vault.azure.net"`)
		http.Error(w, `{"error":{"code":"Unauthorized","message":"AKV10000: Request is missing a Bearer or PoP token."}}`, http.StatusUnauthorized)
		return
	}
	api, ok := apiName(r.Method, r.URL.Path)
	if !ok {
		http.Error(w, `{"error":{"code":"BadParameter","message":"the stand-in serves GetKey, WrapKey and UnwrapKey only"}}`, http.StatusBadRequest)
		return
	}
	// The SDK's fake routes by the API name its client puts into the
	// request's context.
	out := r.Clone(context.WithValue(r.Context(), runtime.CtxAPINameKey{}, api))
	out.RequestURI = ""
	out.URL = &url.URL{Scheme: "https", Host: n.host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery}
	out.Host = n.host
	resp, err := n.s.Transport().Do(out)
	if err != nil {
		// The stand-in is down (Server.Stop): drop the connection.
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				_ = c.Close()
			}
		}
		return
	}
	defer resp.Body.Close()
	for k, vs := range resp.Header {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, resp.Body)
}

// apiName maps the Key Vault REST routes a key service uses to the SDK's API
// names: GET /keys/NAME/[VERSION], POST /keys/NAME[/VERSION]/wrapkey and
// /unwrapkey.
func apiName(method, path string) (string, bool) {
	seg := strings.Split(strings.TrimPrefix(path, "/"), "/")
	if len(seg) < 2 || seg[0] != "keys" || seg[1] == "" {
		return "", false
	}
	if method == http.MethodGet && len(seg) <= 3 {
		return "Client.GetKey", true
	}
	if method != http.MethodPost || len(seg) > 4 {
		return "", false
	}
	switch seg[len(seg)-1] { // the client drops an empty version's "//"
	case "wrapkey":
		return "Client.WrapKey", true
	case "unwrapkey":
		return "Client.UnwrapKey", true
	}
	return "", false
}

// identity is App Service's managed identity endpoint
// (GET ?api-version=2019-08-01&resource=..., header X-IDENTITY-HEADER).
func (n *Network) identity(w http.ResponseWriter, r *http.Request) {
	if subtle.ConstantTimeCompare([]byte(r.Header.Get("X-IDENTITY-HEADER")), []byte(n.idSecret)) != 1 {
		http.Error(w, `{"error":"unauthorized"}`, http.StatusUnauthorized)
		return
	}
	resource := r.URL.Query().Get("resource")
	if resource == "" {
		http.Error(w, `{"error":"invalid_request","error_description":"resource is required"}`, http.StatusBadRequest)
		return
	}
	exp := time.Now().Add(time.Hour).Unix()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{
		"access_token": n.token, "token_type": "Bearer", "resource": resource,
		"expires_on": strconv.FormatInt(exp, 10), "expires_in": "3600",
	})
}

// writeCA writes a private CA to dir/ca.pem and returns a certificate for
// the vault's host signed by it.
func (n *Network) writeCA() (tls.Certificate, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "kubekms test CA (Key Vault stand-in)"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	if ca, err = x509.ParseCertificate(caDER); err != nil {
		return tls.Certificate{}, err
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: n.host}, DNSNames: []string{n.host},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	pemCA := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(filepath.Join(n.dir, "ca.pem"), pemCA, 0o600); err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}, nil
}

func randomHex(t testing.TB) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// bufferedConn reads what the CONNECT request's reader buffered first.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// oneConnListener serves one connection to an http.Server.
type oneConnListener struct {
	c    net.Conn
	once sync.Once
	done chan struct{}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	var c net.Conn
	l.once.Do(func() { c = &closeNotifyConn{Conn: l.c, done: l.done} })
	if c != nil {
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}

func (l *oneConnListener) Close() error   { return nil }
func (l *oneConnListener) Addr() net.Addr { return l.c.LocalAddr() }

// closeNotifyConn ends its listener's Accept when the connection closes.
type closeNotifyConn struct {
	net.Conn
	once sync.Once
	done chan struct{}
}

func (c *closeNotifyConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
