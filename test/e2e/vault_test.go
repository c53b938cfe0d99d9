//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kubekms/kubekms/internal/testservers/vaultserver"
	"github.com/kubekms/kubekms/keyservice"
	"github.com/kubekms/kubekms/keyservice/vault"
	"github.com/kubekms/kubekms/test/e2e/cluster"
)

// vaultCertKey is a transit key on a real Vault server over https, and the
// key URI of a plugin that logs in with a TLS client certificate
// (auth=cert): how a static-pod plugin reaches Vault before any
// service-account token exists.
func vaultCertKey(t *testing.T) (*vaultserver.TransitKey, string) {
	t.Helper()
	srv := vaultserver.New(t, vaultserver.Options{TLS: true})
	k := srv.NewTransitKey(t)
	srv.EnableAuth(t, "cert", "cert")
	srv.Write(t, "auth/cert/certs/control-plane", map[string]any{
		"certificate": string(srv.CA.PEM), "token_policies": k.Policy, "token_ttl": "1h",
	})
	dir := t.TempDir()
	cert, key := filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key")
	srv.CA.Issue(t, cert, key, "control-plane-1", vaultserver.ClientCert)
	return k, k.URIWith("auth=cert&role=control-plane&cert-file=" + cert + "&key-file=" + key)
}

// TestVaultCluster runs etcd + a real Vault + kubekms + kube-apiserver and
// walks it through what Vault adds: values stored under Vault key IDs, a
// transit rotation without restarts, Vault restarted on its storage and
// sealed (outages the apiserver must not notice), and a cold apiserver
// restart that unwraps through Vault again.
func TestVaultCluster(t *testing.T) {
	t.Parallel() // with TestVaultKubernetesAuth: each has its own cluster
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	k, uri := vaultCertKey(t)
	c := startKMSClusterOn(ctx, t, b, uri)
	w := newWritten()
	const ns = "e2e-vault"
	if err := ensureNamespace(ctx, c.api.Client, ns); err != nil {
		t.Fatal(err)
	}
	n := 0
	write := func(t *testing.T, count int) {
		t.Helper()
		for range count {
			n++
			if err := createSecret(ctx, c.api.Client, w, ns, fmt.Sprintf("s-%d", n), "vault-plaintext-"+randomHex(t, 12)); err != nil {
				t.Fatal(err)
			}
		}
	}
	status := func(t *testing.T) string {
		t.Helper()
		st, err := c.plugin.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Healthz != "ok" {
			t.Fatalf("plugin healthz %q", st.Healthz)
		}
		return st.KeyId
	}

	t.Run("StoredUnderVaultKeyID", func(t *testing.T) {
		write(t, 20)
		keyID := status(t)
		if !strings.HasPrefix(keyID, "vault:"+k.Mount+"/kek:v1:") {
			t.Fatalf("plugin key_id %q is not version 1 of the Vault key", keyID)
		}
		all := storedEncrypted(ctx, t, c.etcd)
		byKey := cluster.CountBy(all, func(s cluster.Stored) string { return s.Format + " " + s.KeyID() })
		if byKey["kms-v2:kubekms "+keyID] != len(all) {
			t.Fatalf("stored values by format and key_id: %v, want all kms-v2:kubekms under %q", byKey, keyID)
		}
		requireReadBack(ctx, t, c.api.Client, w.snapshot(), "Vault key")
		encrypts := k.Server.Requests(t, k.Mount+"/encrypt/kek")
		if encrypts < 1 || encrypts > 2 {
			t.Errorf("Vault saw %d transit encrypts for %d objects, want 1 (one local KEK)", encrypts, len(all))
		}
		t.Logf("MEASURED Vault cluster: %d objects under %s; Vault transit encrypts %d, decrypts %d, logins %d",
			len(all), keyID, encrypts, k.Server.Requests(t, k.Mount+"/decrypt/kek"), k.Server.Requests(t, "auth/cert/login"))
	})

	t.Run("TransitRotation", func(t *testing.T) {
		old := status(t)
		rotated := time.Now()
		k.Rotate(t)
		var fresh string
		for deadline := time.Now().Add(time.Minute); ; {
			if fresh = status(t); fresh != old {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("plugin key_id still %q a minute after the transit rotation", old)
			}
			time.Sleep(500 * time.Millisecond)
		}
		pluginSaw := time.Since(rotated)
		for deadline := time.Now().Add(3 * time.Minute); ; {
			write(t, 1)
			s, err := c.etcd.ReadStored(ctx, fmt.Sprintf("/registry/secrets/%s/s-%d", ns, n))
			if err != nil {
				t.Fatal(err)
			}
			if len(s) == 1 && s[0].KeyID() == fresh {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("new writes not under %q 3 minutes after the rotation", fresh)
			}
			time.Sleep(5 * time.Second)
		}
		t.Logf("MEASURED transit rotation: plugin Status changed after %s, first write under %s after %s",
			pluginSaw.Round(time.Millisecond), fresh, time.Since(rotated).Round(time.Second))
		requireReadBack(ctx, t, c.api.Client, w.snapshot(), "after the transit rotation")
	})

	// Outages inside the grace: the apiserver must see no failure at all.
	for _, o := range []struct {
		name      string
		down, up  func(t testing.TB)
		wantInLog string
	}{
		{"VaultRestarted", k.Server.Stop, k.Server.Start, "connection refused"},
		{"VaultSealed", k.Server.Seal, k.Server.Unseal, "Vault is sealed"},
	} {
		t.Run(o.name, func(t *testing.T) {
			o.down(t)
			c.plugin.Signal(syscall.SIGHUP) // re-probe now, not at the next 20 s tick
			up := false
			t.Cleanup(func() {
				if !up {
					o.up(t)
				}
			})
			start := time.Now()
			for time.Since(start) < 10*time.Second {
				write(t, 1)
				requireReadBack(ctx, t, c.api.Client, w.snapshot(), "during "+o.name)
				status(t)
				time.Sleep(time.Second)
			}
			log, err := os.ReadFile(c.plugin.LogPath)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(log), o.wantInLog) {
				t.Errorf("the plugin log does not show the outage (%q)", o.wantInLog)
			}
			o.up(t)
			up = true
			write(t, 1)
			requireReadBack(ctx, t, c.api.Client, w.snapshot(), "after "+o.name)
		})
	}

	t.Run("ColdAPIServerRestart", func(t *testing.T) {
		before := k.Server.Requests(t, k.Mount+"/decrypt/kek")
		if err := c.plugin.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := c.plugin.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := c.api.Restart(ctx, c.opts); err != nil {
			t.Fatal(err)
		}
		requireReadBack(ctx, t, c.api.Client, w.snapshot(), "after a plugin and apiserver restart")
		decrypts := k.Server.Requests(t, k.Mount+"/decrypt/kek") - before
		if decrypts < 1 || decrypts > 3 {
			t.Errorf("a restarted plugin made %d transit decrypts to read everything back, want 1-3 (one per local KEK)", decrypts)
		}
		t.Logf("MEASURED cold restart: %d objects read back with %d Vault transit decrypts", len(w.snapshot()), decrypts)
	})
}

// TestVaultKubernetesAuth: Vault's kubernetes auth configured against the
// real apiserver (TokenReview with a reviewer service account's token),
// and a plugin that logs in with a token from the TokenRequest API. A token
// of another service account, of the wrong audience, or of a deleted
// service account is refused by the real TokenReview.
func TestVaultKubernetesAuth(t *testing.T) {
	t.Parallel()
	b := needBinaries(t)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	etcd, err := cluster.StartEtcd(ctx, t, b.etcd)
	if err != nil {
		t.Fatal(err)
	}
	api, err := cluster.NewAPIServer(t, b.apiserver, etcd.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := api.Start(ctx, cluster.StartOptions{}); err != nil {
		t.Fatal(err)
	}
	const ns = "kms-system"
	if err := ensureNamespace(ctx, api.Client, ns); err != nil {
		t.Fatal(err)
	}
	for _, sa := range []string{"kubekms", "vault-reviewer", "intruder"} {
		if _, err := api.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	files := 0
	tokenFile := func(t *testing.T, sa string, audiences ...string) string {
		t.Helper()
		files++
		tok := requestToken(ctx, t, api.Client, ns, sa, audiences)
		return vaultserver.WriteFile(t, filepath.Join(dir, fmt.Sprintf("%s-%d.jwt", sa, files)), tok)
	}

	k := vaultserver.New(t, vaultserver.Options{}).NewTransitKey(t)
	srv := k.Server
	ca, err := os.ReadFile(filepath.Join(api.CertDir(), "apiserver.crt"))
	if err != nil {
		t.Fatal(err)
	}
	srv.EnableAuth(t, "kubernetes", "kubernetes")
	srv.Write(t, "auth/kubernetes/config", map[string]any{
		"kubernetes_host": api.Config.Host, "kubernetes_ca_cert": string(ca),
		"token_reviewer_jwt": requestToken(ctx, t, api.Client, ns, "vault-reviewer", nil), "disable_local_ca_jwt": true,
	})
	srv.Write(t, "auth/kubernetes/role/kubekms", map[string]any{
		"bound_service_account_names": "kubekms", "bound_service_account_namespaces": ns, "audience": "vault",
		"token_policies": k.Policy, "token_ttl": "1h",
	})
	uri := func(jwtFile string) string { return k.URIWith("auth=kubernetes&role=kubekms&jwt-file=" + jwtFile) }

	good := tokenFile(t, "kubekms", "vault")
	plugin, err := cluster.NewPlugin(t, b.kubekms)
	if err != nil {
		t.Fatal(err)
	}
	plugin.KeyURI = uri(good)
	if err := plugin.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if n := srv.Requests(t, "auth/kubernetes/login"); n != 1 {
		t.Fatalf("%d kubernetes logins, want 1", n)
	}
	// The apiserver now encrypts through the plugin, which holds its Vault
	// token (a restart of the apiserver does not need a new login).
	opts := cluster.StartOptions{EncryptionConfig: cluster.EncryptionConfig(cluster.KMSv2("kubekms", plugin.Endpoint()), cluster.Identity)}
	if _, err := api.Restart(ctx, opts); err != nil {
		t.Fatal(err)
	}
	w := newWritten()
	if err := createSecret(ctx, api.Client, w, ns, "through-kubernetes-auth", "k8s-auth-plaintext-"+randomHex(t, 8)); err != nil {
		t.Fatal(err)
	}
	stored, err := etcd.ReadStored(ctx, "/registry/secrets/"+ns+"/through-kubernetes-auth")
	if err != nil {
		t.Fatal(err)
	}
	if len(stored) != 1 || !strings.HasPrefix(stored[0].KeyID(), "vault:"+k.Mount+"/kek:") {
		t.Fatalf("secret stored as %+v, want a kms v2 value under the Vault key", stored)
	}
	requireReadBack(ctx, t, api.Client, w.snapshot(), "kubernetes auth")

	// login opens a fresh backend on the JWT file (so it logs in) and
	// probes the key.
	login := func(t *testing.T, jwtFile string) error {
		t.Helper()
		svc, err := vault.Open(ctx, uri(jwtFile), keyservice.Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer svc.Close()
		_, err = svc.Probe(ctx)
		return err
	}
	refused := func(t *testing.T, jwtFile, why string) {
		t.Helper()
		err := login(t, jwtFile)
		if err == nil || !strings.Contains(err.Error(), "kubernetes login") || keyservice.Classify(err) == keyservice.ClassRevoked {
			t.Fatalf("login with %s: %v (class %v), want a refused kubernetes login that is not revoked", why, err, keyservice.Classify(err))
		}
	}
	t.Run("OtherServiceAccount", func(t *testing.T) { refused(t, tokenFile(t, "intruder", "vault"), "another service account's token") })
	t.Run("WrongAudience", func(t *testing.T) { refused(t, tokenFile(t, "kubekms", "not-vault"), "a token for another audience") })
	t.Run("DeletedServiceAccount", func(t *testing.T) {
		// A second good token logs in while its service account exists ...
		again := tokenFile(t, "kubekms", "vault")
		if err := login(t, again); err != nil {
			t.Fatalf("login with a second token of the bound service account: %v", err)
		}
		if err := api.Client.CoreV1().ServiceAccounts(ns).Delete(ctx, "kubekms", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// ... and not after: TokenReview rejects a token whose service
		// account is gone (once the apiserver's informer has seen the delete).
		deleted := time.Now()
		for login(t, again) == nil {
			if time.Since(deleted) > 30*time.Second {
				t.Fatal("a deleted service account's token still logs in 30 s after the delete")
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Logf("MEASURED the deleted service account's token was refused %.1f s after the delete", time.Since(deleted).Seconds())
		refused(t, again, "a deleted service account's token")
	})
}

// requestToken asks the TokenRequest API for a service-account token.
func requestToken(ctx context.Context, t *testing.T, c kubernetes.Interface, ns, sa string, audiences []string) string {
	t.Helper()
	expiry := int64(3600)
	tr, err := c.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authv1.TokenRequest{
		Spec: authv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: &expiry},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}
