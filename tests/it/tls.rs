//! Agents through a mosquitto TLS listener (mutual TLS).
