// Package metrics holds kubekms's Prometheus collectors. They are registered
// on a registry the caller owns (no global state); a nil *Metrics records
// nothing, so tests and libraries can pass nil.
package metrics

import (
	"crypto/sha256"
	"encoding/hex"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

const namespace = "kubekms"

// Metrics are the collectors the plugin and the hierarchy update.
type Metrics struct {
	grpcRequests   *prometheus.CounterVec
	grpcLatency    *prometheus.HistogramVec
	remoteCalls    *prometheus.CounterVec
	remoteLatency  *prometheus.HistogramVec
	cacheLookups   *prometheus.CounterVec
	cacheHit       prometheus.Counter // resolved once: looked up on every Decrypt
	cacheMiss      prometheus.Counter
	cacheSize      prometheus.Gauge
	kekCreated     *prometheus.CounterVec
	kekAge         prometheus.Gauge
	kekUses        prometheus.Gauge
	keyIDInfo      *prometheus.GaugeVec
	healthy        prometheus.Gauge
	graceRemaining prometheus.Gauge
	inflightRemote prometheus.Gauge
}

// New creates the collectors and registers them on reg.
func New(reg prometheus.Registerer) *Metrics {
	latency := []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	m := &Metrics{
		grpcRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "grpc_requests_total",
			Help: "KMS gRPC requests by service (v2, v1beta1), method and gRPC code.",
		}, []string{"service", "method", "code"}),
		grpcLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "grpc_request_duration_seconds",
			Help: "KMS gRPC request latency by service, method and gRPC code.", Buckets: latency,
		}, []string{"service", "method", "code"}),
		remoteCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "keyservice_calls_total",
			Help: "Calls (attempts) to the remote key service by operation (wrap, unwrap, probe) and outcome (ok or the error class).",
		}, []string{"operation", "outcome"}),
		remoteLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "keyservice_call_duration_seconds",
			Help: "Latency of remote key-service calls by operation.", Buckets: latency,
		}, []string{"operation"}),
		cacheLookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "local_kek_cache_lookups_total",
			Help: "Lookups of unwrapped local KEKs by result (hit, miss).",
		}, []string{"result"}),
		cacheSize: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "local_kek_cache_size", Help: "Unwrapped local KEKs in the cache.",
		}),
		kekCreated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "local_kek_created_total",
			Help: "Local KEKs made or restored, by reason (startup, restored, remote_key_changed, max_uses, max_age, revoked).",
		}, []string{"reason"}),
		kekAge: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "local_kek_age_seconds", Help: "Age of the local KEK that encrypts new seeds.",
		}),
		kekUses: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "local_kek_uses", Help: "Encryptions done with the current local KEK.",
		}),
		keyIDInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: namespace, Name: "key_id_info",
			Help: "1 for the current remote key ID, labelled with its SHA-256 hash like the apiserver's key_id_hash.",
		}, []string{"key_id_hash"}),
		healthy: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "healthy", Help: "1 when Status reports healthz ok.",
		}),
		graceRemaining: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "outage_grace_remaining_seconds",
			Help: "Seconds left before an unreachable key service makes the plugin unhealthy; the full grace when reachable.",
		}),
		inflightRemote: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "keyservice_inflight_calls", Help: "Remote key-service calls in flight.",
		}),
	}
	m.cacheHit, m.cacheMiss = m.cacheLookups.WithLabelValues("hit"), m.cacheLookups.WithLabelValues("miss")
	reg.MustRegister(m.grpcRequests, m.grpcLatency, m.remoteCalls, m.remoteLatency, m.cacheLookups, m.cacheSize,
		m.kekCreated, m.kekAge, m.kekUses, m.keyIDInfo, m.healthy, m.graceRemaining, m.inflightRemote)
	return m
}

// HashKeyID returns "sha256:<hex>" of a key ID, as the apiserver labels it.
func HashKeyID(keyID string) string {
	sum := sha256.Sum256([]byte(keyID))
	return "sha256:" + hex.EncodeToString(sum[:])
}

// GRPC records one gRPC request. A non-empty uid (the apiserver's request
// id) is attached to the latency observation as an exemplar, so a slow bucket
// leads to the log lines and trace of one envelope operation without making
// the uid a label (which would explode the series count).
func (m *Metrics) GRPC(service, method, code, uid string, d time.Duration) {
	if m == nil {
		return
	}
	m.grpcRequests.WithLabelValues(service, method, code).Inc()
	observe(m.grpcLatency.WithLabelValues(service, method, code), uid, d)
}

func observe(obs prometheus.Observer, uid string, d time.Duration) {
	if eo, ok := obs.(prometheus.ExemplarObserver); ok && uid != "" && len(uid) <= 64 {
		eo.ObserveWithExemplar(d.Seconds(), prometheus.Labels{"uid": uid})
		return
	}
	obs.Observe(d.Seconds())
}

// Calls are the series of one gRPC method, with the OK ones resolved once:
// the hot path then costs two atomic adds, no label hashing or lookup.
type Calls struct {
	m               *Metrics
	service, method string
	okCount         prometheus.Counter
	okLatency       prometheus.Observer
}

// Calls returns the series of one method (nil for a nil *Metrics).
func (m *Metrics) Calls(service, method string) *Calls {
	if m == nil {
		return nil
	}
	return &Calls{m: m, service: service, method: method,
		okCount:   m.grpcRequests.WithLabelValues(service, method, "OK"),
		okLatency: m.grpcLatency.WithLabelValues(service, method, "OK")}
}

// Record counts one call with its gRPC code and latency. A non-empty uid is
// attached as an exemplar: the plugin passes it for the calls it logs, so
// every exemplar leads to a log line (an exemplar costs allocations, and a
// bucket keeps only its latest one anyway).
func (c *Calls) Record(code, uid string, d time.Duration) {
	if c == nil {
		return
	}
	if code != "OK" {
		c.m.GRPC(c.service, c.method, code, uid, d)
		return
	}
	c.okCount.Inc()
	observe(c.okLatency, uid, d)
}

// Remote records one remote key-service attempt.
func (m *Metrics) Remote(op, outcome string, d time.Duration) {
	if m == nil {
		return
	}
	m.remoteCalls.WithLabelValues(op, outcome).Inc()
	m.remoteLatency.WithLabelValues(op).Observe(d.Seconds())
}

// RemoteInflight adds delta to the in-flight remote calls.
func (m *Metrics) RemoteInflight(delta float64) {
	if m != nil {
		m.inflightRemote.Add(delta)
	}
}

// CacheLookup records a local KEK cache hit or miss.
func (m *Metrics) CacheLookup(hit bool) {
	if m == nil {
		return
	}
	if hit {
		m.cacheHit.Inc()
	} else {
		m.cacheMiss.Inc()
	}
}

// CacheSize sets the cache size.
func (m *Metrics) CacheSize(n int) {
	if m != nil {
		m.cacheSize.Set(float64(n))
	}
}

// KEKCreated records a new current local KEK.
func (m *Metrics) KEKCreated(reason string) {
	if m != nil {
		m.kekCreated.WithLabelValues(reason).Inc()
	}
}

// KEK sets the current local KEK's age and use count.
func (m *Metrics) KEK(age time.Duration, uses uint64) {
	if m == nil {
		return
	}
	m.kekAge.Set(age.Seconds())
	m.kekUses.Set(float64(uses))
}

// Health sets the health state, the current key ID and the outage grace left.
func (m *Metrics) Health(healthy bool, keyID string, grace time.Duration) {
	if m == nil {
		return
	}
	if healthy {
		m.healthy.Set(1)
	} else {
		m.healthy.Set(0)
	}
	m.graceRemaining.Set(max(grace, 0).Seconds())
	if keyID != "" {
		m.keyIDInfo.Reset()
		m.keyIDInfo.WithLabelValues(HashKeyID(keyID)).Set(1)
	}
}
