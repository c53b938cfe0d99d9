// Package convergence measures which KMS key_id every kube-apiserver of a
// cluster writes under, from what the cluster itself exposes: the apiserver
// identity Leases (kube-system, label apiserver.kubernetes.io/identity)
// say how many apiservers there are, and each apiserver's own metrics say
// which key_id its last KMS v2 Status poll returned and which key_id it last
// wrote under (apiserver_envelope_encryption_key_id_hash_*, labelled with
// "sha256:<hex>" of the key_id and of the apiserver's identity, the same
// hash kubekms_key_id_info carries). A rotation has converged when every
// apiserver writes under the new key_id; only then does a storage migration
// store every object under it.
package convergence

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/kubekms/kubekms/internal/metrics"
)

// The apiserver's metrics this package reads (k8s.io/apiserver v0.37
// pkg/storage/value/encrypt/envelope/metrics and
// pkg/server/options/encryptionconfig/metrics). All are ALPHA upstream:
// exposed by default, but their names may change in a later release.
const (
	// Gauge {transformation_type, provider_name, key_id_hash, apiserver_id_hash}:
	// the last time a key_id was used to write (to_storage) or read (from_storage).
	metricKeyIDLastUse = "apiserver_envelope_encryption_key_id_hash_last_timestamp_seconds"
	// Gauge {provider_name, key_id_hash, apiserver_id_hash}: the last time the
	// plugin's Status returned a key_id.
	metricKeyIDStatus = "apiserver_envelope_encryption_key_id_hash_status_last_timestamp_seconds"
	// Gauge {apiserver_id_hash, hash}: the encryption configuration in use.
	metricConfigInfo = "apiserver_encryption_config_controller_last_config_info"
	// Gauge: the apiserver's process start, unix seconds.
	metricProcessStart = "process_start_time_seconds"

	labelType     = "transformation_type"
	labelProvider = "provider_name"
	labelKeyHash  = "key_id_hash"
	labelIDHash   = "apiserver_id_hash"
	labelConfig   = "hash"

	toStorage   = "to_storage"
	fromStorage = "from_storage"
)

// HashKeyID is the apiserver's label for a key_id (and for an apiserver
// identity): "sha256:<hex>".
func HashKeyID(keyID string) string { return metrics.HashKeyID(keyID) }

// KeyUse is one key_id hash and the last time it was used.
type KeyUse struct {
	Hash string    `json:"keyIDHash"`
	Last time.Time `json:"last"`
}

// ProviderMetrics are one KMS v2 provider's key_id series on one apiserver,
// each list newest first.
type ProviderMetrics struct {
	Status []KeyUse // key_ids the plugin's Status returned
	Writes []KeyUse // key_ids new values were written under
	Reads  []KeyUse // key_ids stored values were read under
}

// Metrics is what one scrape of an apiserver's /metrics says about
// encryption at rest.
type Metrics struct {
	// IDHash is sha256 of the apiserver's identity (its identity Lease's
	// name), from the labels; empty if the scrape does not say.
	IDHash string
	// ConfigHash is the hash of its EncryptionConfiguration file.
	ConfigHash string
	// Started is its process start time (zero if not exposed).
	Started   time.Time
	Providers map[string]*ProviderMetrics
}

// ParseMetrics reads a Prometheus text exposition of kube-apiserver. The
// series of other apiserver identities than the scraped one (never there
// in a real apiserver's answer) are ignored.
func ParseMetrics(r io.Reader) (*Metrics, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse apiserver metrics: %w", err)
	}
	m := &Metrics{Providers: map[string]*ProviderMetrics{}}
	if f := fams[metricConfigInfo]; f != nil {
		for _, s := range f.GetMetric() {
			m.IDHash, m.ConfigHash = label(s, labelIDHash), label(s, labelConfig)
		}
	}
	if f := fams[metricProcessStart]; f != nil && len(f.GetMetric()) > 0 {
		m.Started = unixTime(sampleValue(f.GetMetric()[0]))
	}
	if m.IDHash == "" { // an apiserver that never loaded an encryption config
		for _, name := range []string{metricKeyIDStatus, metricKeyIDLastUse} {
			for _, s := range fams[name].GetMetric() {
				if id := label(s, labelIDHash); id != "" && m.IDHash == "" {
					m.IDHash = id
				}
			}
		}
	}
	provider := func(s *dto.Metric) *ProviderMetrics {
		if m.IDHash != "" && label(s, labelIDHash) != m.IDHash {
			return nil
		}
		name := label(s, labelProvider)
		p := m.Providers[name]
		if p == nil {
			p = &ProviderMetrics{}
			m.Providers[name] = p
		}
		return p
	}
	for _, s := range fams[metricKeyIDStatus].GetMetric() {
		if p := provider(s); p != nil {
			p.Status = append(p.Status, KeyUse{Hash: label(s, labelKeyHash), Last: unixTime(sampleValue(s))})
		}
	}
	for _, s := range fams[metricKeyIDLastUse].GetMetric() {
		p := provider(s)
		if p == nil {
			continue
		}
		u := KeyUse{Hash: label(s, labelKeyHash), Last: unixTime(sampleValue(s))}
		switch label(s, labelType) {
		case toStorage:
			p.Writes = append(p.Writes, u)
		case fromStorage:
			p.Reads = append(p.Reads, u)
		}
	}
	newestFirst := func(a, b KeyUse) int { return b.Last.Compare(a.Last) }
	for _, p := range m.Providers {
		slices.SortFunc(p.Status, newestFirst)
		slices.SortFunc(p.Writes, newestFirst)
		slices.SortFunc(p.Reads, newestFirst)
	}
	return m, nil
}

func label(s *dto.Metric, name string) string {
	for _, l := range s.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func sampleValue(s *dto.Metric) float64 {
	switch {
	case s.GetGauge() != nil:
		return s.GetGauge().GetValue()
	case s.GetCounter() != nil:
		return s.GetCounter().GetValue()
	case s.GetUntyped() != nil:
		return s.GetUntyped().GetValue()
	}
	return 0
}

func unixTime(sec float64) time.Time {
	if sec <= 0 || math.IsNaN(sec) || math.IsInf(sec, 0) {
		return time.Time{}
	}
	whole, frac := math.Modf(sec)
	return time.Unix(int64(whole), int64(frac*1e9)).UTC()
}

// KMSHealth is the apiserver's own verdict on its KMS providers: the
// kms-provider checks of /readyz?verbose ("[+]kms-providers ok").
type KMSHealth struct {
	// Checks maps each kms check name to whether it passed.
	Checks map[string]bool
}

// OK reports whether at least one KMS check is listed and all passed.
func (h KMSHealth) OK() bool {
	if len(h.Checks) == 0 {
		return false
	}
	for _, ok := range h.Checks {
		if !ok {
			return false
		}
	}
	return true
}

// ParseReadyz reads the kms-provider lines of a verbose /readyz answer.
func ParseReadyz(body string) KMSHealth {
	h := KMSHealth{Checks: map[string]bool{}}
	for _, line := range strings.Split(body, "\n") {
		line = strings.TrimSpace(line)
		var ok bool
		switch {
		case strings.HasPrefix(line, "[+]"):
			ok = true
		case strings.HasPrefix(line, "[-]"):
		default:
			continue
		}
		name, _, _ := strings.Cut(line[3:], " ")
		if strings.HasPrefix(name, "kms-provider") {
			h.Checks[name] = ok
		}
	}
	return h
}
