// Package hierarchy is the local key hierarchy: a local KEK (AES-256-GCM)
// seals the apiserver's seeds, and the remote key service wraps only the local
// KEK, once. Unwrapped local KEKs are cached so Decrypt makes no remote call
// for a known local KEK; a new local KEK is made when the remote key ID
// changes, after MaxUses encryptions, or after MaxAge.
//
// The hierarchy also owns the behaviour every backend shares: retries of
// transient errors, outage grace, crypto-shredding on revocation, and a cached
// health probe.
package hierarchy

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"

	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
	"golang.org/x/sync/singleflight"

	"github.com/kubekms/kubekms/internal/metrics"
	"github.com/kubekms/kubekms/keyservice"
)

// Config tunes the hierarchy. Zero values take the defaults.
type Config struct {
	// MaxUses is how many seeds one local KEK seals (default 2^21).
	MaxUses uint64
	// MaxAge is how long one local KEK seals new seeds (default 7 days).
	MaxAge time.Duration
	// CacheSize bounds the unwrapped local KEKs kept (default 1000).
	CacheSize int
	// ProbeInterval is how long a health probe result is reused, and how
	// often the background loop probes (default 30 s).
	ProbeInterval time.Duration
	// OutageGrace is how long the plugin keeps serving from its cache and
	// current local KEK while the key service is unreachable (default 1 h).
	OutageGrace time.Duration
	// RevocationBound is the longest time between the key service revoking
	// the key and the plugin dropping the local KEKs it wrapped (default 1 m).
	RevocationBound time.Duration
	// RemoteTimeout bounds a remote call made without a caller's deadline
	// (start-up, background probes; default 10 s).
	RemoteTimeout time.Duration
	// MaxConcurrentRemote bounds concurrent remote calls (default 16).
	MaxConcurrentRemote int
	// State, if set, keeps the current local KEK (wrapped) across restarts.
	State StateStore

	Logger  *slog.Logger
	Metrics *metrics.Metrics
	Tracer  trace.Tracer
	// Now is the clock; tests replace it.
	Now func() time.Time
}

func (c *Config) defaults() {
	if c.MaxUses == 0 {
		c.MaxUses = 1 << 21
	}
	if c.MaxAge == 0 {
		c.MaxAge = 7 * 24 * time.Hour
	}
	if c.CacheSize == 0 {
		c.CacheSize = 1000
	}
	if c.ProbeInterval == 0 {
		c.ProbeInterval = 30 * time.Second
	}
	if c.OutageGrace == 0 {
		c.OutageGrace = time.Hour
	}
	if c.RevocationBound == 0 {
		c.RevocationBound = time.Minute
	}
	if c.RemoteTimeout == 0 {
		c.RemoteTimeout = 10 * time.Second
	}
	if c.MaxConcurrentRemote == 0 {
		c.MaxConcurrentRemote = 16
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Tracer == nil {
		c.Tracer = noop.NewTracerProvider().Tracer("")
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// localKEK is one local key-encrypting key.
type localKEK struct {
	key         []byte // zeroed on eviction (best effort: the AES key schedule in aead is not reachable)
	aead        cipher.AEAD
	annotation  []byte // encoded annotation value: format, created, wrapped
	remoteKeyID string
	created     time.Time
	uses        atomic.Uint64
}

func newLocalKEK(key, annotation []byte, remoteKeyID string, created time.Time) (*localKEK, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("local KEK: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("local KEK: %w", err)
	}
	return &localKEK{key: key, aead: aead, annotation: annotation, remoteKeyID: remoteKeyID, created: created}, nil
}

func cacheKey(keyID string, annotation []byte) string { return keyID + "\x00" + string(annotation) }

// Sealed is the result of Encrypt.
type Sealed struct {
	Ciphertext  []byte
	KeyID       string
	Annotations map[string][]byte
}

// Hierarchy is safe for concurrent use.
type Hierarchy struct {
	svc    keyservice.Service
	cfg    Config
	log    *slog.Logger
	m      *metrics.Metrics
	tracer trace.Tracer
	now    func() time.Time

	current   atomic.Pointer[localKEK]
	cache     *lru.Cache[string, *localKEK]
	flight    singleflight.Group
	remoteSem chan struct{}

	mu     sync.Mutex
	health healthState

	stop chan struct{}
	done chan struct{}
}

// New builds a hierarchy over svc and starts its background probe loop. It
// tries to make (or restore) the first local KEK before it returns, so the
// first Encrypt is fast; if the key service is down it returns anyway and the
// loop keeps trying (Status says why it is not ready).
func New(ctx context.Context, svc keyservice.Service, cfg Config) (*Hierarchy, error) {
	cfg.defaults()
	h := &Hierarchy{
		svc: svc, cfg: cfg, log: cfg.Logger, m: cfg.Metrics, tracer: cfg.Tracer, now: cfg.Now,
		remoteSem: make(chan struct{}, cfg.MaxConcurrentRemote),
		stop:      make(chan struct{}), done: make(chan struct{}),
	}
	cache, err := lru.NewWithEvict(cfg.CacheSize, func(_ string, k *localKEK) {
		if k != h.current.Load() {
			clear(k.key)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("local KEK cache: %w", err)
	}
	h.cache = cache
	h.health.started = h.now()
	if err := h.start(ctx); err != nil {
		h.log.Warn("local key hierarchy not ready at start-up; retrying in the background", "error", err)
	}
	go h.loop()
	return h, nil
}

// start probes the key service and makes or restores the first local KEK.
func (h *Hierarchy) start(ctx context.Context) error {
	keyID, err := h.probe(ctx)
	if err != nil {
		return err
	}
	return h.ensureKEK(ctx, keyID)
}

// ensureKEK makes (or restores) a local KEK when there is none, and rotates
// ahead of the limits otherwise.
func (h *Hierarchy) ensureKEK(ctx context.Context, keyID string) error {
	if h.current.Load() != nil {
		h.maybeRotate(ctx)
		return nil
	}
	if h.cfg.State != nil && h.restore(ctx, keyID) {
		return nil
	}
	_, err := h.rotate(ctx, "startup")
	if err != nil {
		h.log.Warn("could not make a local KEK", "error", err)
	}
	return err
}

// Close stops the background loop. It does not close the key service.
func (h *Hierarchy) Close() {
	select {
	case <-h.stop:
	default:
		close(h.stop)
	}
	<-h.done
}

func (h *Hierarchy) loop() {
	defer close(h.done)
	every := min(h.cfg.ProbeInterval, h.cfg.RevocationBound)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), h.cfg.RemoteTimeout)
		if keyID, err := h.probe(ctx); err == nil { // probe logs its own failures
			_ = h.ensureKEK(ctx, keyID)
			h.checkCachedVersions(ctx, keyID)
		}
		h.Status(ctx) // refreshes the health metrics; the probe above is fresh, so no second call
		cancel()
	}
}

// Encrypt seals plaintext (the apiserver's seed) with the current local KEK.
func (h *Hierarchy) Encrypt(ctx context.Context, plaintext []byte) (Sealed, error) {
	switch {
	case len(plaintext) == 0:
		return Sealed{}, badRequest("plaintext is empty")
	case len(plaintext) > MaxPlaintext:
		return Sealed{}, badRequest("plaintext is %d bytes; at most %d fit the apiserver's %d-byte ciphertext limit",
			len(plaintext), MaxPlaintext, MaxCiphertext)
	}
	k, err := h.encryptionKEK(ctx)
	if err != nil {
		return Sealed{}, err
	}
	out := make([]byte, 1+nonceSize, SealOverhead+len(plaintext))
	out[0] = sealV1
	if _, err := rand.Read(out[1:]); err != nil {
		return Sealed{}, fmt.Errorf("seal: nonce: %w", err)
	}
	out = k.aead.Seal(out, out[1:1+nonceSize], plaintext, sealAAD(k.remoteKeyID, k.annotation))
	return Sealed{
		Ciphertext:  out,
		KeyID:       k.remoteKeyID,
		Annotations: map[string][]byte{AnnotationKey: k.annotation},
	}, nil
}

// Decrypt opens a ciphertext made by Encrypt, given the key ID and
// annotations that Encrypt returned with it.
func (h *Hierarchy) Decrypt(ctx context.Context, keyID string, ciphertext []byte, annotations map[string][]byte) ([]byte, error) {
	if err := checkSealed(ciphertext); err != nil {
		return nil, err
	}
	if keyID == "" {
		return nil, badRequest("key_id is empty")
	}
	if len(keyID) > MaxKeyID {
		return nil, badRequest("key_id is %d bytes, more than %d", len(keyID), MaxKeyID)
	}
	ann, ok := annotations[AnnotationKey]
	if !ok {
		return nil, badRequest("annotation %s is missing: the ciphertext was not made by kubekms", AnnotationKey)
	}
	k, err := h.decryptionKEK(ctx, keyID, ann)
	if err != nil {
		return nil, err
	}
	nonce := ciphertext[1 : 1+nonceSize]
	out, err := k.aead.Open(nil, nonce, ciphertext[1+nonceSize:], sealAAD(keyID, ann))
	if err != nil {
		return nil, badRequest("ciphertext failed authentication: the ciphertext, key_id or annotation was altered or swapped")
	}
	return out, nil
}

// encryptionKEK returns the local KEK for a new seal, making a new one when
// the remote key changed, the KEK is used up, or it is too old.
func (h *Hierarchy) encryptionKEK(ctx context.Context) (*localKEK, error) {
	k := h.current.Load()
	hs := h.healthSnapshot()
	if hs.revoked {
		return nil, keyservice.Revoked("encrypt", fmt.Errorf("the key is revoked: %v", hs.lastErr))
	}
	reason := ""
	switch {
	case k == nil:
		reason = "startup"
	case hs.keyID != "" && k.remoteKeyID != hs.keyID:
		reason = "remote_key_changed"
	case k.uses.Load() >= h.cfg.MaxUses:
		reason = "max_uses"
	case h.now().Sub(k.created) >= h.cfg.MaxAge:
		reason = "max_age"
	}
	if reason == "" {
		h.use(ctx, k)
		return k, nil
	}
	nk, err := h.rotate(ctx, reason)
	if err == nil {
		h.use(ctx, nk)
		return nk, nil
	}
	// Outage tolerance: a used-up or old KEK stays in service while the key
	// service is unreachable, within the grace period. A changed remote key
	// cannot be served by the old KEK: the apiserver checks the key ID.
	if k != nil && (reason == "max_uses" || reason == "max_age") && h.inGrace(err) && k.uses.Load() < hardMaxUses {
		h.log.Warn("keeping the current local KEK while the key service is unreachable", "reason", reason, "error", err)
		h.use(ctx, k)
		return k, nil
	}
	return nil, fmt.Errorf("make local KEK: %w", err)
}

// use counts one seal with k.
func (h *Hierarchy) use(ctx context.Context, k *localKEK) {
	h.reserveUses(ctx, k, k.uses.Add(1))
}

// hardMaxUses is the most seals a KEK makes even during an outage: far below
// the 2^32 random-nonce bound of AES-GCM.
const hardMaxUses = 1 << 30

// rotate makes a new local KEK, wraps it remotely and makes it current. Calls
// that overlap share one remote call.
func (h *Hierarchy) rotate(ctx context.Context, reason string) (*localKEK, error) {
	v, err, _ := h.flight.Do("rotate", func() (any, error) {
		key := make([]byte, kekSize)
		if _, err := rand.Read(key); err != nil {
			return nil, fmt.Errorf("generate local KEK: %w", err)
		}
		var res keyservice.WrapResult
		err := h.remote(ctx, "wrap", func(ctx context.Context) (err error) {
			res, err = h.svc.Wrap(ctx, key)
			return err
		})
		if err != nil {
			clear(key)
			return nil, fmt.Errorf("wrap local KEK: %w", err)
		}
		if res.KeyID == "" || len(res.KeyID) > MaxKeyID {
			return nil, fmt.Errorf("key service returned a key ID of %d bytes (want 1..%d)", len(res.KeyID), MaxKeyID)
		}
		created := h.now()
		ann := encodeAnnotation(created, res.Wrapped)
		if len(AnnotationKey)+len(ann) > MaxAnnotations {
			return nil, fmt.Errorf("wrapped local KEK is %d bytes, over the apiserver's annotation limit", len(res.Wrapped))
		}
		k, err := newLocalKEK(key, ann, res.KeyID, time.Unix(created.Unix(), 0))
		if err != nil {
			return nil, err
		}
		h.install(k, reason)
		if h.cfg.State != nil {
			if err := h.cfg.State.Save(ctx, k.state()); err != nil {
				h.log.Warn("could not save the local KEK state; a restart will make a new local KEK", "error", err)
			}
		}
		return k, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*localKEK), nil
}

// install makes k current and caches it for Decrypt.
func (h *Hierarchy) install(k *localKEK, reason string) {
	h.cache.Add(cacheKey(k.remoteKeyID, k.annotation), k)
	h.current.Store(k)
	h.mu.Lock()
	h.health.keyID = k.remoteKeyID
	h.mu.Unlock()
	h.m.KEKCreated(reason)
	h.m.CacheSize(h.cache.Len())
	h.log.Info("new local KEK", "reason", reason, "key_id", k.remoteKeyID)
}

// maybeRotate rotates ahead of the limits from the background loop, so no
// Encrypt waits for the remote call.
func (h *Hierarchy) maybeRotate(ctx context.Context) {
	k := h.current.Load()
	if k == nil {
		return
	}
	hs := h.healthSnapshot()
	if hs.revoked || hs.lastErr != nil {
		return
	}
	reason := ""
	switch {
	case hs.keyID != "" && k.remoteKeyID != hs.keyID:
		reason = "remote_key_changed"
	case k.uses.Load() >= h.cfg.MaxUses*9/10:
		reason = "max_uses"
	case h.now().Sub(k.created) >= h.cfg.MaxAge-2*h.cfg.ProbeInterval:
		reason = "max_age"
	}
	h.m.KEK(h.now().Sub(k.created), k.uses.Load())
	if reason == "" {
		return
	}
	if _, err := h.rotate(ctx, reason); err != nil {
		h.log.Warn("background local KEK rotation failed", "reason", reason, "error", err)
	}
}

// decryptionKEK finds the local KEK for (keyID, annotation) in the cache or
// unwraps it remotely. Concurrent misses for one KEK share one remote call.
func (h *Hierarchy) decryptionKEK(ctx context.Context, keyID string, ann []byte) (*localKEK, error) {
	ck := cacheKey(keyID, ann)
	if k, ok := h.cache.Get(ck); ok {
		h.m.CacheLookup(true)
		return k, nil
	}
	h.m.CacheLookup(false)
	parsed, err := decodeAnnotation(ann)
	if err != nil {
		return nil, err
	}
	v, err, _ := h.flight.Do("unwrap\x00"+ck, func() (any, error) {
		if k, ok := h.cache.Get(ck); ok {
			return k, nil
		}
		var key []byte
		err := h.remote(ctx, "unwrap", func(ctx context.Context) (err error) {
			key, err = h.svc.Unwrap(ctx, keyID, parsed.wrapped)
			return err
		})
		if err != nil {
			if keyservice.Classify(err) == keyservice.ClassRevoked {
				h.shred(keyID, err)
			}
			return nil, fmt.Errorf("unwrap local KEK: %w", err)
		}
		if len(key) != kekSize {
			clear(key)
			return nil, keyservice.Invalid("unwrap", fmt.Errorf("unwrapped local KEK is %d bytes, want %d", len(key), kekSize))
		}
		k, err := newLocalKEK(key, bytesClone(ann), keyID, parsed.created)
		if err != nil {
			return nil, err
		}
		h.cache.Add(ck, k)
		h.m.CacheSize(h.cache.Len())
		return k, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*localKEK), nil
}

func bytesClone(b []byte) []byte { return append([]byte(nil), b...) }

// shred drops cached local KEKs wrapped by keyID (all of them when keyID is
// empty): the key service revoked the key, so the plugin must stop using it.
func (h *Hierarchy) shred(keyID string, cause error) {
	n := 0
	for _, ck := range h.cache.Keys() {
		k, ok := h.cache.Peek(ck)
		if ok && (keyID == "" || k.remoteKeyID == keyID) {
			h.cache.Remove(ck)
			clear(k.key)
			n++
		}
	}
	if cur := h.current.Load(); cur != nil && (keyID == "" || cur.remoteKeyID == keyID) {
		h.current.CompareAndSwap(cur, nil)
		clear(cur.key)
	}
	h.m.CacheSize(h.cache.Len())
	if n > 0 {
		h.log.Warn("key revoked by the key service: dropped the local KEKs it wrapped", "key_id", keyID, "dropped", n, "error", cause)
	}
}

// checkCachedVersions asks the key service, when it can tell cheaply,
// whether the older key IDs of cached local KEKs are still usable, and drops
// the local KEKs of revoked ones.
func (h *Hierarchy) checkCachedVersions(ctx context.Context, current string) {
	vc, ok := h.svc.(keyservice.VersionChecker)
	if !ok {
		return
	}
	seen := map[string]bool{current: true}
	for _, k := range h.cache.Values() {
		if seen[k.remoteKeyID] {
			continue
		}
		seen[k.remoteKeyID] = true
		keyID := k.remoteKeyID
		err := h.remote(ctx, "check", func(ctx context.Context) error { return vc.CheckKeyID(ctx, keyID) })
		if keyservice.Classify(err) == keyservice.ClassRevoked {
			h.shred(keyID, err)
		}
	}
}

// remote runs one key-service operation with the concurrency bound, retries
// of transient errors (exponential backoff with jitter, within ctx's
// deadline), tracing and metrics.
func (h *Hierarchy) remote(ctx context.Context, op string, fn func(context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, h.cfg.RemoteTimeout)
		defer cancel()
	}
	ctx, span := h.tracer.Start(ctx, "keyservice."+op)
	defer span.End()
	select {
	case h.remoteSem <- struct{}{}:
	case <-ctx.Done():
		return keyservice.Transient(op, fmt.Errorf("waiting for a free remote call slot: %w", ctx.Err()))
	}
	defer func() { <-h.remoteSem }()
	h.m.RemoteInflight(1)
	defer h.m.RemoteInflight(-1)
	err := retry(ctx, func() error {
		start := h.now()
		err := fn(ctx)
		outcome := "ok"
		if err != nil {
			outcome = keyservice.Classify(err).String()
		}
		h.m.Remote(op, outcome, time.Since(start))
		return err
	})
	if err != nil {
		span.RecordError(err)
	}
	return err
}

// healthState is what the probes learned.
type healthState struct {
	started   time.Time
	keyID     string
	lastCheck time.Time
	lastOK    time.Time
	lastErr   error
	revoked   bool
}

func (h *Hierarchy) healthSnapshot() healthState {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.health
}

// inGrace reports whether err is an outage (not a revocation or bad input)
// and the key service was last reachable within the grace period.
func (h *Hierarchy) inGrace(err error) bool {
	switch keyservice.Classify(err) {
	case keyservice.ClassRevoked, keyservice.ClassInvalid:
		return false
	}
	hs := h.healthSnapshot()
	last := hs.lastOK
	if last.IsZero() {
		return false
	}
	return h.now().Sub(last) < h.cfg.OutageGrace
}

// probe asks the key service for its current key ID (no paid crypto call)
// and records the outcome: revocation shreds the cache; a changed key ID is
// noted so the next Encrypt (or the background loop) makes a new local KEK.
func (h *Hierarchy) probe(ctx context.Context) (string, error) {
	v, err, _ := h.flight.Do("probe", func() (any, error) {
		var keyID string
		err := h.remote(ctx, "probe", func(ctx context.Context) (err error) {
			keyID, err = h.svc.Probe(ctx)
			return err
		})
		if err == nil && (keyID == "" || len(keyID) > MaxKeyID) {
			err = fmt.Errorf("key service reported a key ID of %d bytes (want 1..%d)", len(keyID), MaxKeyID)
		}
		now := h.now()
		h.mu.Lock()
		wasRevoked := h.health.revoked
		h.health.lastCheck = now
		h.health.lastErr = err
		if err == nil {
			if h.health.keyID != "" && h.health.keyID != keyID {
				h.log.Info("remote key changed", "old_key_id", h.health.keyID, "key_id", keyID)
			}
			h.health.keyID = keyID
			h.health.lastOK = now
			h.health.revoked = false
		} else if keyservice.Classify(err) == keyservice.ClassRevoked {
			h.health.revoked = true
		}
		h.mu.Unlock()
		switch {
		case err == nil && wasRevoked:
			h.log.Info("key service reports the key usable again")
		case err != nil && keyservice.Classify(err) == keyservice.ClassRevoked:
			h.shred("", err)
		case err != nil:
			h.log.Warn("key service probe failed", "error", err, "grace_remaining", h.graceRemaining().String())
		}
		return keyID, err
	})
	if err != nil {
		return "", err
	}
	return v.(string), nil
}

func (h *Hierarchy) graceRemaining() time.Duration {
	hs := h.healthSnapshot()
	if hs.lastOK.IsZero() {
		return 0
	}
	return max(h.cfg.OutageGrace-h.now().Sub(hs.lastOK), 0)
}

// Health is the answer to Status.
type Health struct {
	OK bool
	// Reason is a short message when !OK, or a note when OK during an outage.
	Reason string
	KeyID  string
	// GraceRemaining is the outage grace left (the full grace when reachable).
	GraceRemaining time.Duration
}

// Status returns the health from a probe at most ProbeInterval old, probing
// inline when the cached result is older.
func (h *Hierarchy) Status(ctx context.Context) Health {
	if hs := h.healthSnapshot(); h.now().Sub(hs.lastCheck) >= h.cfg.ProbeInterval {
		if keyID, err := h.probe(ctx); err == nil {
			h.ensureKEK(ctx, keyID)
		}
	}
	hs := h.healthSnapshot()
	cur := h.current.Load()
	out := Health{KeyID: hs.keyID, GraceRemaining: h.graceRemaining()}
	switch {
	case hs.revoked:
		out.Reason = "key revoked by the key service: " + short(hs.lastErr)
	case hs.keyID == "":
		out.Reason = "key service not reached yet: " + short(hs.lastErr)
	case cur == nil:
		out.Reason = "no local KEK yet: " + short(hs.lastErr)
	case hs.lastErr != nil && !h.inGrace(hs.lastErr):
		out.Reason = fmt.Sprintf("key service failing since %s: %s", hs.lastOK.UTC().Format(time.RFC3339), short(hs.lastErr))
	case hs.lastErr != nil:
		out.OK = true
		out.Reason = fmt.Sprintf("key service unreachable, serving from cache; grace ends in %s", out.GraceRemaining.Round(time.Second))
	default:
		out.OK = true
		out.GraceRemaining = h.cfg.OutageGrace
	}
	if !out.OK {
		out.GraceRemaining = 0
	}
	h.m.Health(out.OK, out.KeyID, out.GraceRemaining)
	return out
}

// short trims an error for the healthz field.
func short(err error) string {
	if err == nil {
		return "no error recorded"
	}
	s := err.Error()
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// SelfTest seals and opens a random value with the current local KEK (no
// remote call when the KEK is current): it answers "can the plugin encrypt
// right now".
func (h *Hierarchy) SelfTest(ctx context.Context) error {
	if h.current.Load() == nil {
		return errors.New("no local KEK yet")
	}
	probe := make([]byte, 32)
	if _, err := rand.Read(probe); err != nil {
		return err
	}
	s, err := h.Encrypt(ctx, probe)
	if err != nil {
		return fmt.Errorf("seal: %w", err)
	}
	if _, err := h.Decrypt(ctx, s.KeyID, s.Ciphertext, s.Annotations); err != nil {
		return fmt.Errorf("open: %w", err)
	}
	return nil
}
