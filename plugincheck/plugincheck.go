// Package plugincheck checks KMS v2 plugins the way kube-apiserver uses
// them: Status, one Encrypt and Decrypt round trip with a fresh uid, and
// the apiserver's limits on the answers; and, for the plugins of several
// control-plane nodes, that each decrypts what every other encrypts (an
// object written through one apiserver is read through any).
package plugincheck

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"time"

	"github.com/google/uuid"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/hierarchy"
	"github.com/kubekms/kubekms/plugin"
)

// Report is what Check measured.
type Report struct {
	Endpoint      string   `json:"endpoint"`
	Version       string   `json:"version"`
	Healthz       string   `json:"healthz"`
	KeyID         string   `json:"key_id"`
	StatusMillis  float64  `json:"status_ms"`
	EncryptMillis float64  `json:"encrypt_ms,omitempty"`
	DecryptMillis float64  `json:"decrypt_ms,omitempty"`
	UID           string   `json:"uid,omitempty"`
	Problems      []string `json:"problems"`
}

// Check asks the plugin at endpoint for Status and, if roundTrip and it is
// healthy, encrypts and decrypts a random 32-byte seed. Rule violations are
// Problems; the error is for a plugin that could not be asked at all.
func Check(ctx context.Context, endpoint string, timeout time.Duration, roundTrip bool) (*Report, error) {
	c, err := kmsclient.Dial(endpoint, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	rep := &Report{Endpoint: endpoint, Problems: []string{}}
	problem := func(format string, args ...any) { rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...)) }

	start := time.Now()
	st, err := c.StatusAnswer(ctx)
	rep.StatusMillis = millis(time.Since(start))
	if err != nil {
		return nil, fmt.Errorf("status call: %w", err)
	}
	rep.Version, rep.Healthz, rep.KeyID = st.Version, st.Healthz, st.KeyID
	if st.Version != "v2" && st.Version != "v2beta1" {
		problem("version is %q; the apiserver wants v2 (or v2beta1)", st.Version)
	}
	if st.Healthz != "ok" {
		problem("healthz is %q, not \"ok\"", st.Healthz)
	}
	switch {
	case st.KeyID == hierarchy.StoppedKeyID:
		problem("key_id is %s: writes stopped (kubekms refuses to seal: its key is revoked, or its key service unreachable past the outage grace; "+
			"healthz says which); the apiservers refuse writes once their current seed expires", st.KeyID)
	case st.KeyID == "" || len(st.KeyID) > 1024:
		problem("key_id is %d bytes; the apiserver wants 1..1024", len(st.KeyID))
	}
	if !roundTrip || st.Healthz != "ok" {
		return rep, nil
	}
	seed, err := randomSeed()
	if err != nil {
		return nil, err
	}
	rep.UID = uuid.NewString()
	start = time.Now()
	enc, err := c.Encrypt(ctx, rep.UID, seed)
	rep.EncryptMillis = millis(time.Since(start))
	if err != nil {
		problem("Encrypt: %v", err)
		return rep, nil
	}
	if err := plugin.CheckEncryptAnswer(enc.Ciphertext, enc.KeyID, enc.Annotations); err != nil {
		problem("Encrypt answer: %v", err)
	}
	if enc.KeyID != st.KeyID {
		problem("Encrypt's key_id %q differs from Status's %q: the apiserver would refuse the new seed", enc.KeyID, st.KeyID)
	}
	start = time.Now()
	plain, err := c.Decrypt(ctx, rep.UID, &kmsservice.DecryptRequest{Ciphertext: enc.Ciphertext, KeyID: enc.KeyID, Annotations: enc.Annotations})
	rep.DecryptMillis = millis(time.Since(start))
	switch {
	case err != nil:
		problem("Decrypt: %v", err)
	case !bytes.Equal(plain, seed):
		problem("Decrypt returned different bytes than were encrypted")
	}
	return rep, nil
}

func randomSeed() ([]byte, error) {
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		return nil, err
	}
	return seed, nil
}

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// Cross has every plugin encrypt a random seed and every other plugin
// decrypt it. It returns one problem per pair that fails: with a keyring
// per node (softkey) that is a node whose keyring differs.
func Cross(ctx context.Context, endpoints []string, timeout time.Duration) ([]string, error) {
	clients := make([]*kmsclient.Client, len(endpoints))
	for i, ep := range endpoints {
		c, err := kmsclient.Dial(ep, timeout)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		clients[i] = c
	}
	var problems []string
	for i, enc := range clients {
		seed, err := randomSeed()
		if err != nil {
			return nil, err
		}
		resp, err := enc.Encrypt(ctx, uuid.NewString(), seed)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: Encrypt: %v", endpoints[i], err))
			continue
		}
		for j, dec := range clients {
			if i == j {
				continue
			}
			plain, err := dec.Decrypt(ctx, uuid.NewString(), &kmsservice.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: resp.KeyID, Annotations: resp.Annotations})
			switch {
			case err != nil:
				problems = append(problems, fmt.Sprintf("%s cannot decrypt what %s encrypted under %s: %v", endpoints[j], endpoints[i], resp.KeyID, err))
			case !bytes.Equal(plain, seed):
				problems = append(problems, fmt.Sprintf("%s decrypted what %s encrypted to different bytes", endpoints[j], endpoints[i]))
			}
		}
	}
	return problems, nil
}
