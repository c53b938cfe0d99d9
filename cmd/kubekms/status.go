package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"

	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/spf13/cobra"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kubekms/kubekms/envelope/kmsclient"
	"github.com/kubekms/kubekms/plugin"
)

// statusReport is what `kubekms status` measures.
type statusReport struct {
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

func newStatusCmd() *cobra.Command {
	var endpoint, output string
	var timeout time.Duration
	var noRoundTrip bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Check any KMS v2 plugin: Status, one Encrypt/Decrypt round trip, the apiserver's limits",
		Long: `Checks a KMS v2 plugin (kubekms or any other) the way kube-apiserver uses it: Status, then one
Encrypt and Decrypt of a random 32-byte seed with a fresh uid, timing each, and the limits the
apiserver enforces on the answers. Exit code 0 when all is well, 2 when the plugin answered but
is unhealthy or broke a rule, 1 when it could not be reached.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rep, err := checkPlugin(cmd.Context(), endpoint, timeout, !noRoundTrip)
			if err != nil {
				return err
			}
			if output == "json" {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(rep); err != nil {
					return err
				}
			} else {
				printStatus(cmd, rep)
			}
			if len(rep.Problems) > 0 {
				return &exitError{code: 2, err: fmt.Errorf("%d problem(s) found", len(rep.Problems))}
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&endpoint, "endpoint", defaultListen(), "plugin socket: unix:///path.sock")
	cmd.Flags().DurationVar(&timeout, "timeout", kmsclient.DefaultTimeout, "per-call timeout (the apiserver's default is 3s)")
	cmd.Flags().BoolVar(&noRoundTrip, "status-only", false, "only call Status (no Encrypt/Decrypt)")
	cmd.Flags().StringVarP(&output, "output", "o", "text", "output: text or json")
	return cmd
}

func checkPlugin(ctx context.Context, endpoint string, timeout time.Duration, roundTrip bool) (*statusReport, error) {
	c, err := kmsclient.Dial(endpoint, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	rep := &statusReport{Endpoint: endpoint, Problems: []string{}}
	problem := func(format string, args ...any) { rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...)) }

	start := time.Now()
	st, err := c.Status(ctx)
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
	if st.KeyID == "" || len(st.KeyID) > 1024 {
		problem("key_id is %d bytes; the apiserver wants 1..1024", len(st.KeyID))
	}
	if !roundTrip || st.Healthz != "ok" {
		return rep, nil
	}
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
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

func millis(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func printStatus(cmd *cobra.Command, r *statusReport) {
	w := cmd.OutOrStdout()
	fmt.Fprintf(w, "endpoint:  %s\nversion:   %s\nhealthz:   %s\nkey_id:    %s\n", r.Endpoint, r.Version, r.Healthz, r.KeyID)
	fmt.Fprintf(w, "Status:    %.2f ms\n", r.StatusMillis)
	if r.UID != "" {
		fmt.Fprintf(w, "Encrypt:   %.2f ms\nDecrypt:   %.2f ms\nuid:       %s\n", r.EncryptMillis, r.DecryptMillis, r.UID)
	}
	if len(r.Problems) == 0 {
		fmt.Fprintln(w, "result:    ok")
		return
	}
	for _, p := range r.Problems {
		fmt.Fprintf(w, "problem:   %s\n", p)
	}
}
